"""A study's calibration sets, built once and kept in the cache under their calibration key."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..data.calibset import CalibManifest, CalibSet, build_study_calibset
from .cache import Cache
from .spec import CalibChoice, ModelAxis

if TYPE_CHECKING:
    from ..models.load import LoadedModel


def obtain_calibset(
    loaded: LoadedModel, model: ModelAxis, calib: CalibChoice, key: str, cache: Cache, data_dir: str | None = None
) -> CalibSet:
    """The calibration set from the cache, or built and stored (tokens mode or examples mode)."""
    with cache.claim("calib", key):  # works sharing a calibration set build it once
        got = cache.get_tensors("calib", key)
        meta = cache.get_json("calib", key)
        if got is not None and meta is not None:
            return CalibSet(got["input_ids"], CalibManifest(**meta["manifest"]))
        cs = build_study_calibset(loaded, model.name, calib, data_dir)
        cache.put_tensors("calib", key, {"input_ids": cs.input_ids})
        cache.put_json("calib", key, {"manifest": cs.manifest.to_dict(), "choice": calib.to_dict()})
        return cs
