"""Tasks over datasets the user keeps under --data-dir: BOSS, C-Eval, CMMLU.

Layout expected under DATA_DIR (missing files are named in the error):

  boss/<Task>/<dataset>/train.tsv|test.tsv   BOSS "process" format, a header row, then
        SentimentAnalysis:        text, label   (0 negative, 1 positive, 2 neutral)
        ToxicDetection:           text, label   (0 benign, 1 toxic)
        NaturalLanguageInference: premise, hypothesis, label (0 entailment, 1 neutral, 2 contradiction)
  boss/ExtractiveQA/<dataset>/train.json|test.json   JSON lines {"context", "question", "answers": [str] or {"text": [...]}}
       datasets: ExtractiveQA {squad (ID), advqa, newsqa, searchqa}; SentimentAnalysis {amazon (ID), dynasent,
       semeval, sst5}; NaturalLanguageInference {mnli (ID), anli, contractnli, wanli};
       ToxicDetection {civil_comments (ID), adv_civil, implicit_hate, toxigen}.
       Only the ID dataset needs train.*: BOSS draws in-context examples from ID training data.
  ceval/dev/<subject>_dev.csv, ceval/val/<subject>_val.csv    (the official ceval-exam archive; val is scored)
  cmmlu/dev/<subject>.csv, cmmlu/test/<subject>.csv           (the official CMMLU archive)
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

from ..errors import DataError
from .taskdef import TaskDef

# Liu et al. carve this many items (seed 42) out of a test-only dataset as its calibration
# split (BOSS OOD sets, CMMLU); they are then not scored
CARVED_CALIB_ITEMS = 300

# ---------------------------------------------------------------- BOSS

_BOSS_INSTR = {
    "SentimentAnalysis": (
        "Solve the sentiment analysis task. Options for sentiment: negative, positive, neutral.",
        "Text: {{Text}} // Prediction: {{Prediction}}",
    ),
    "ToxicDetection": (
        "Solve the toxic detection task. Options for toxicity: benign, toxic.",
        "Text: {{Text}} // Prediction: {{Prediction}}",
    ),
    "NaturalLanguageInference": (
        "Solve the NLI task. Options for entailment relationship: entailment, neutral, contradiction.",
        "Premise: {{Premise}} // Hypothesis: {{Hypothesis}} // Prediction: {{Prediction}}",
    ),
    "ExtractiveQA": (
        "Solve the extractive question answering task. Refering to the passage below and extract answer "
        "for the question. The answer should be the shortest phrase as it can be.",
        "Passage: {{Passage}} // Question: {{Question}} // Answer: {{Answer}}.",
    ),
}
_BOSS_LABELS = {
    "SentimentAnalysis": ["negative", "positive", "neutral"],
    "ToxicDetection": ["benign", "toxic"],
    "NaturalLanguageInference": ["entailment", "neutral", "contradiction"],
}
BOSS = {  # task dir -> (short name, ID dataset, OOD datasets, shots, metric)
    "ExtractiveQA": ("eqa", "squad", ("advqa", "newsqa", "searchqa"), 1, "f1"),
    "SentimentAnalysis": ("sa", "amazon", ("dynasent", "semeval", "sst5"), 3, "acc"),
    "NaturalLanguageInference": ("nli", "mnli", ("anli", "contractnli", "wanli"), 3, "acc"),
    "ToxicDetection": ("td", "civil_comments", ("adv_civil", "implicit_hate", "toxigen"), 2, "acc"),
}


def boss_expected_files(data_dir: Path) -> list[Path]:
    out = []
    for tdir, (_s, idd, ood, _k, _m) in BOSS.items():
        ext = "json" if tdir == "ExtractiveQA" else "tsv"
        out.append(data_dir / "boss" / tdir / idd / f"train.{ext}")
        out += [data_dir / "boss" / tdir / d / f"test.{ext}" for d in (idd, *ood)]
    return out


def _need(files: list[Path], what: str, data_dir: Path | None) -> None:
    missing = [f for f in files if not f.is_file()]
    if data_dir is None or missing:
        root = data_dir if data_dir is not None else Path("DATA_DIR")
        shown = missing if data_dir is not None else files
        names = ", ".join(str(f.relative_to(root)) if f.is_relative_to(root) else str(f) for f in shown[:8])
        more = f" and {len(shown) - 8} more" if len(shown) > 8 else ""
        where = f"under {data_dir}" if data_dir is not None else "under --data-dir (none given)"
        raise DataError(
            f"{what} needs local files {where}; missing: {names}{more} "
            f"(layout: see `quantshift.evaluation.localdata` docs)"
        )


def _read_tsv(path: Path) -> list[list[str]]:
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r for r in rows[1:] if r]  # header row first


def _boss_cls_items(tdir: str, dataset: str, split: str, path: Path) -> list[dict]:
    labels = _BOSS_LABELS[tdir]
    items = []
    for i, row in enumerate(_read_tsv(path)):
        try:
            label = int(float(row[-1]))
        except ValueError:
            continue
        if not 0 <= label < len(labels):
            continue
        if tdir == "NaturalLanguageInference":
            if len(row) < 3:
                continue
            shot = f"Premise: {row[0]} // Hypothesis: {row[1]} // Prediction:"
        else:
            shot = f"Text: {row[0]} // Prediction:"
        items.append(
            {
                "id": f"{dataset}/{split}/{i}",
                "query": "### Input ###\n" + shot,
                "shot": shot,
                "choices": labels,
                "gold": label,
                "split": split,
            }
        )
    return items


def _boss_qa_items(dataset: str, split: str, path: Path) -> list[dict]:
    items = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        rec = json.loads(line)
        ans = rec.get("answers", [])
        if isinstance(ans, dict):
            ans = ans.get("text", [])
        ans = [a if isinstance(a, str) else a.get("text", "") for a in ans]
        if not ans:
            continue
        shot = f"Passage: {rec['context']} // Question: {rec['question']} // Answer:"
        items.append(
            {
                "id": f"{dataset}/{split}/{i}",
                "query": "### Input ###\n" + shot,
                "shot": shot,
                "answers": ans,
                "split": split,
            }
        )
    return items


def _boss_loader(tdir: str, dataset: str) -> Callable[[Path | None], list[dict]]:
    def load(data_dir: Path | None) -> list[dict]:
        _s, idd, _ood, _k, _m = BOSS[tdir]
        ext = "json" if tdir == "ExtractiveQA" else "tsv"
        root = (data_dir or Path("DATA_DIR")) / "boss" / tdir
        train, test = root / idd / f"train.{ext}", root / dataset / f"test.{ext}"
        _need([train, test], f"BOSS task {tdir}/{dataset}", data_dir)
        if tdir == "ExtractiveQA":
            return _boss_qa_items(idd, "train", train) + _boss_qa_items(dataset, "test", test)
        return _boss_cls_items(tdir, idd, "train", train) + _boss_cls_items(tdir, dataset, "test", test)

    return load


def _boss_tasks() -> list[TaskDef]:
    out = []
    for tdir, (short, idd, ood, shots, _metric) in BOSS.items():
        instr, fmt = _BOSS_INSTR[tdir]
        preamble = f"### Instruction ###\n{instr}\n### Format ###\n{fmt}\n### Example ###\n"
        for ds in (idd, *ood):
            out.append(
                TaskDef(
                    f"boss_{short}_{ds}",
                    f"BOSS {tdir} on {ds} ({'ID' if ds == idd else 'OOD'}), {shots}-shot from {idd} train",
                    f"boss_{short}",
                    _boss_loader(tdir, ds),
                    kind="gen" if tdir == "ExtractiveQA" else "mc",
                    needs="data-dir",
                    preamble=preamble,
                    fewshot_delimiter="\n",
                    default_shots=shots,
                    until=("\n", " //"),
                    source_note=f"DATA_DIR/boss/{tdir}/{ds}/",
                    calib_from_test=0 if ds == idd else CARVED_CALIB_ITEMS,
                )
            )
    return out


# ---------------------------------------------------------------- C-Eval / CMMLU

CEVAL_CATEGORIES = {
    "STEM": "computer_network operating_system computer_architecture college_programming college_physics "
    "college_chemistry advanced_mathematics probability_and_statistics discrete_mathematics "
    "electrical_engineer metrology_engineer high_school_mathematics high_school_physics high_school_chemistry "
    "high_school_biology middle_school_mathematics middle_school_biology middle_school_physics "
    "middle_school_chemistry veterinary_medicine",
    "Social Science": "college_economics business_administration marxism mao_zedong_thought education_science "
    "teacher_qualification high_school_politics high_school_geography middle_school_politics "
    "middle_school_geography",
    "Humanities": "modern_chinese_history ideological_and_moral_cultivation logic law chinese_language_and_literature "
    "art_studies professional_tour_guide legal_professional high_school_chinese high_school_history "
    "middle_school_history",
    "Other": "civil_servant sports_science plant_protection basic_medicine clinical_medicine urban_and_rural_planner "
    "accountant fire_engineer environmental_impact_assessment_engineer tax_accountant physician",
}
# CMMLU's own grouping (its first subcategory decides; "China specific" subjects keep their main category)
CMMLU_CATEGORIES = {
    "STEM": "anatomy astronomy college_actuarial_science college_engineering_hydrology college_mathematics "
    "college_medical_statistics computer_science conceptual_physics electrical_engineering "
    "elementary_mathematics genetics high_school_biology high_school_chemistry high_school_mathematics "
    "high_school_physics machine_learning virology",
    "Humanities": "arts chinese_history chinese_literature college_law global_facts international_law jurisprudence "
    "logical marxist_theory philosophy professional_law world_history world_religions",
    "Social Science": "ancient_chinese business_ethics chinese_civil_service_exam chinese_food_culture "
    "chinese_foreign_policy chinese_teacher_qualification college_education economics education "
    "elementary_chinese ethnology high_school_geography high_school_politics journalism management "
    "marketing modern_chinese professional_accounting professional_psychology public_relations "
    "security_study sociology",
    "Other": "agronomy clinical_knowledge college_medicine computer_security construction_project_management "
    "chinese_driving_rule elementary_commonsense elementary_information_and_technology food_science "
    "human_sexuality legal_and_moral_basis nutrition professional_medicine sports_science "
    "traditional_chinese_medicine",
}
_ZH_PREAMBLE = "以下是单项选择题，请直接给出正确答案的选项。\n\n"


def _exam_rows(path: Path, bench: str) -> list[dict]:
    with path.open(encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        q = r.get("question") or r.get("Question") or ""
        ans = (r.get("answer") or r.get("Answer") or "").strip()
        if not q or ans not in ("A", "B", "C", "D"):
            continue
        out.append({"question": q.strip(), "choices": [str(r.get(k, "")).strip() for k in "ABCD"], "answer": ans})
    return out


def _exam_loader(bench: str, category: str) -> Callable[[Path | None], list[dict]]:
    cats = CEVAL_CATEGORIES if bench == "ceval" else CMMLU_CATEGORIES
    subjects = cats[category].split()

    def paths(data_dir: Path, subject: str) -> tuple[Path, Path]:
        root = data_dir / bench
        if bench == "ceval":
            return root / "dev" / f"{subject}_dev.csv", root / "val" / f"{subject}_val.csv"
        return root / "dev" / f"{subject}.csv", root / "test" / f"{subject}.csv"

    def load(data_dir: Path | None) -> list[dict]:
        files = [p for s in subjects for p in paths(data_dir or Path("DATA_DIR"), s)]
        _need(files, f"{bench} ({category})", data_dir)
        items = []
        for s in subjects:
            for split, path in zip(("train", "test"), paths(data_dir, s)):  # type: ignore[arg-type]
                for i, r in enumerate(_exam_rows(path, bench)):
                    query = (
                        r["question"] + "\n" + "".join(f"{L}. {c}\n" for L, c in zip("ABCD", r["choices"])) + "答案："
                    )
                    items.append(
                        {
                            "id": f"{s}/{split}/{i}",
                            "query": query,
                            "choices": list("ABCD"),
                            "gold": "ABCD".index(r["answer"]),
                            "split": split,
                            "subject": s,
                        }
                    )
        return items

    return load


def _exam_tasks() -> list[TaskDef]:
    out = []
    for bench, cats in (("ceval", CEVAL_CATEGORIES), ("cmmlu", CMMLU_CATEGORIES)):
        for cat in cats:
            key = cat.lower().replace(" ", "_")
            out.append(
                TaskDef(
                    f"{bench}_{key}",
                    f"{'C-Eval (val)' if bench == 'ceval' else 'CMMLU (test)'} {cat} subjects, letter by log-likelihood",
                    cat,
                    _exam_loader(bench, cat),
                    language="zh",
                    needs="data-dir",
                    preamble=_ZH_PREAMBLE,
                    source_note=f"DATA_DIR/{bench}/",
                    calib_from_test=CARVED_CALIB_ITEMS if bench == "cmmlu" else 0,
                )
            )
    return out


def task_defs() -> list[TaskDef]:
    """BOSS, C-Eval and CMMLU tasks (data under --data-dir), for tasks.py to register."""
    return _boss_tasks() + _exam_tasks()
