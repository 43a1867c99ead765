"""Write one small preference file per layout that `data=pairs` reads, to try them (docs/data.md).

    python scripts/example_preference_files.py --out outputs/examples

Each file holds the same arithmetic questions (the chosen answer right, the rejected one wrong), written in the
layout's own shape: ShareGPT / LLaMA-Factory (`sharegpt.json`), TRL conversational with an implicit prompt
(`trl_conversational.jsonl`), TRL standard with an implicit prompt (`trl_implicit.jsonl`), Alpaca
(`alpaca.json`) and a file whose columns need renaming (`renamed.jsonl`: question, response_j, response_k).
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def questions(n: int, seed: int) -> list[tuple[str, str, str]]:
    """(question, right answer, wrong answer), distinct questions."""
    rng = random.Random(seed)
    seen, out = set(), []
    while len(out) < n:
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        wrong = a + b + rng.choice([-10, -2, -1, 1, 2, 10])
        out.append((f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", f"{a} plus {b} is {wrong}."))
    return out


def layouts(rows: list[tuple[str, str, str]]) -> dict[str, list[dict]]:
    def message(role, text):
        return {"role": role, "content": text}

    return {
        "sharegpt.json": [{"conversations": [{"from": "human", "value": q}], "system": "Answer with the sum.",
                           "chosen": {"from": "gpt", "value": good}, "rejected": {"from": "gpt", "value": bad}}
                          for q, good, bad in rows],
        "trl_conversational.jsonl": [{"chosen": [message("user", q), message("assistant", good)],
                                      "rejected": [message("user", q), message("assistant", bad)]}
                                     for q, good, bad in rows],
        "trl_implicit.jsonl": [{"chosen": f"Question: {q} Answer: {good}", "rejected": f"Question: {q} Answer: {bad}"}
                               for q, good, bad in rows],
        "alpaca.json": [{"instruction": "Add the two numbers.", "input": q, "chosen": good, "rejected": bad}
                        for q, good, bad in rows],
        "renamed.jsonl": [{"question": q, "response_j": " " + good, "response_k": " " + bad} for q, good, bad in rows],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write the files into")
    parser.add_argument("--rows", type=int, default=400, help="rows per file")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, data in layouts(questions(args.rows, args.seed)).items():
        path = args.out / name
        if name.endswith(".json"):  # JSON arrays, as LLaMA-Factory and Alpaca keep them
            path.write_text(json.dumps(data, indent=1) + "\n")
        else:
            path.write_text("".join(json.dumps(row) + "\n" for row in data))
        print(f"wrote {path} ({len(data)} rows)")


if __name__ == "__main__":
    main()
