"""Study runner: grids of calibration sets x test sets x methods, cached, resumable, reported."""
