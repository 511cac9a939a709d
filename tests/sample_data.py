"""A small synthetic MedQuAD-style data set that the tests write themselves (no copy of MedQuAD).

Its rows are templated, not medical facts; they have MedQuAD's shape: four columns, messy whitespace,
questions asked twice with different answers, and a few exact duplicate pairs.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

CONDITIONS = [
    "Alder fever", "Birch syndrome", "Cedar disease", "Dune palsy", "Elm anemia", "Fjord myopathy",
    "Gale dermatitis", "Heath neuropathy", "Iris dystrophy", "Juniper ataxia", "Kelp nephritis", "Larch arthritis",
    "Moss retinopathy", "Nettle colitis", "Oak cardiomyopathy", "Pine hepatitis", "Quartz lung", "Reed deafness",
    "Sage dementia", "Thorn migraine", "Umber leukemia", "Vale myositis", "Willow asthma", "Yarrow thyroiditis",
    "Zinnia lymphoma", "Aspen gout", "Bramble sclerosis", "Clover pancreatitis", "Daisy epilepsy", "Ember psoriasis",
    "Fern cystitis", "Glen osteoporosis", "Hazel glaucoma", "Ivy tremor", "Jasper rickets", "Kestrel tinnitus",
    "Lotus vertigo", "Maple dwarfism", "Nimbus neuralgia", "Orchid carditis", "Poppy apnea", "Quill scoliosis",
    "Rowan sinusitis", "Sorrel nephrosis", "Tansy keratitis", "Ulmus fibrosis", "Violet eczema", "Wren dystonia",
    "Yew hypotonia", "Zephyr colic",
]
SYMPTOMS = ["fever", "fatigue", "headache", "joint pain", "a rash", "shortness of breath", "blurred vision",
            "weight loss", "muscle weakness", "dizziness", "nausea", "a persistent cough"]
TREATMENTS = ["rest and fluids", "physical therapy", "anti-inflammatory medicine", "a special diet",
              "surgery in severe cases", "regular monitoring", "antibiotics", "hearing aids", "eye drops"]
QUESTIONS = {
    "information": "What is (are) {c} ?",
    "symptoms": "What are the symptoms of {c} ?",
    "treatment": "What are the treatments for {c} ?",
    "causes": "What causes {c} ?",
    "inheritance": "Is {c} inherited ?",
    "outlook": "What is the outlook for {c} ?",
}


def _answer(rng: random.Random, kind: str, c: str) -> str:
    s = rng.sample(SYMPTOMS, 3)
    t = rng.sample(TREATMENTS, 2)
    body = {
        "information": f"{c} is a rare condition that affects about 1 in {rng.randint(2, 90)},000 people.",
        "symptoms": f"Signs and symptoms of {c} may include {s[0]}, {s[1]} and {s[2]}.",
        "treatment": f"Treatment of {c} depends on the symptoms and may include {t[0]} and {t[1]}.",
        "causes": f"{c} is caused by changes in the {rng.choice('ABCDEFGHKLMNPRST')}{rng.randint(1, 99)} gene.",
        "inheritance": f"{c} is inherited in an autosomal {rng.choice(['dominant', 'recessive'])} pattern.",
        "outlook": f"Most people with {c} live a normal life span with {t[0]}.",
    }[kind]
    filler = " ".join(rng.choice(["People", "with", "this", "condition", "often", "see", "a", "specialist",
                                  "and", "may", "need", "care", "over", "many", "years."]) for _ in range(rng.randint(10, 120)))
    # MedQuAD-like whitespace: runs of spaces and line breaks to be normalised.
    return f"{body}    {filler}\n                \n                \n    Key points   - {s[0]}"


def sample_rows(n: int = 300, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for c in CONDITIONS:
        for kind, q in QUESTIONS.items():
            rows.append({"question": q.format(c=c), "answer": _answer(rng, kind, c), "source": rng.choice(["GHR", "GARD", "NIDDK"]),
                         "focus_area": c})
    rng.shuffle(rows)
    rows = rows[:n]
    rows += [dict(rows[i], answer=_answer(rng, "information", rows[i]["focus_area"])) for i in range(5)]  # asked twice
    rows += [dict(rows[i]) for i in range(5, 8)]  # exact duplicate pairs
    return rows


def write_sample_csv(path, n: int = 300, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["question", "answer", "source", "focus_area"])
        writer.writeheader()
        writer.writerows(sample_rows(n, seed))
    return path


def write_sample_alpaca_json(path, n: int = 300, seed: int = 1) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [{"instruction": r["question"], "input": "", "output": r["answer"]} for r in sample_rows(n, seed)]
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return path
