"""One turn of the adaptation loop on the demo, through the two command lines as their users would run
them (`make demo-feedback`):

  appliance   ask the labor-category code questions the demo model was never trained on; where an
              answer misses the code, the "operator" writes the correct answer (the code comes from
              `appliance lookup`, the reference table); then a signed export
  builder     import the export (verified against the appliance's public key), SFT then DPO on
              the corrections, a new generation, the corrected questions answered before and after,
              a signed bundle (next version)
  appliance   install the bundle and ask the corrected questions again

Needs `make setup` (the demo generation with its work directory, the demo keys, a provisioned
appliance home). Writes under build/feedback/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
OUT = ROOT / "build" / "feedback"
QUESTIONS = 6


def run(*args: str, capture: bool = True) -> str:
    print("$ " + " ".join(args[:1] + tuple(a if len(a) < 70 else a[:67] + "..." for a in args[1:])), file=sys.stderr)
    done = subprocess.run([str(BIN / args[0]), *args[1:]], cwd=ROOT, text=True,
                          stdout=subprocess.PIPE if capture else None)
    if done.returncode:
        sys.exit(f"{args[0]} {args[1]} failed with exit code {done.returncode}")
    return done.stdout or ""


def ask_all(questions: list[dict]) -> dict[str, dict]:
    answers = {}
    for q in questions:
        a = json.loads(run("appliance", "ask", q["question"], "--json", "--max-tokens", "48", "--temperature", "0"))
        a["right"] = all(m in a["answer"] for m in q["must_contain"])
        answers[q["id"]] = a
    return answers


def correction(q: dict, answer: dict) -> str:
    """What an operator would write: the code from the reference table, cited to the source holding it."""
    code = q["must_contain"][0]
    row = json.loads(run("appliance", "lookup", code, "--json"))["rows"][0]
    cited = next((s["n"] for s in answer["sources"] if code in s["text"]), None)
    return f"The {row['title']} labor category code is {code}" + (f" [{cited}]." if cited else ".")


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from builder.demo import all_held_out

    questions = [q for q in all_held_out() if q["id"].endswith("-code")][:QUESTIONS]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    OUT.mkdir(parents=True, exist_ok=True)

    print("\n== 1. on the appliance: answers, corrections, a signed export", file=sys.stderr)
    before = ask_all(questions)
    for q in questions:
        a = before[q["id"]]
        if a["right"]:
            run("appliance", "feedback", "add", str(a["audit_id"]), "--good")
        else:
            run("appliance", "feedback", "add", str(a["audit_id"]), "--correct", correction(q, a))
    export = OUT / f"export-{stamp}"
    run("appliance", "feedback", "export", "--out", str(export), capture=False)
    home = Path(json.loads(run("appliance", "status", "--json"))["home"])

    print("\n== 2. on the workstation: import, DPO on the corrections, evaluation, a signed bundle", file=sys.stderr)
    data = OUT / "data"
    run("builder", "feedback", "import", str(export), "--trust", str(home / "identity" / "appliance.pub"),
        "--out", str(data), "--heldout", "0", capture=False)
    if not (data / "dpo.jsonl").read_text().strip():
        sys.exit("every answer was right: nothing to correct, so no DPO round (the demo model is too good?)")
    generation = OUT / "generation"  # the demo chain's stages are reused; build/demo-generation stays as it is
    result = json.loads(run("builder", "demo", "--out", str(generation), "--work", "build/.demo-generation.work",
                            "--feedback", str(data)))
    bundle = OUT / f"bundle-{stamp}"
    run("builder", "bundle", "create", "--generation", str(generation), "--keys", "build/demo-keys",
        "--version", "next", "--out", str(bundle))

    print("\n== 3. on the appliance: install, ask again", file=sys.stderr)
    run("appliance", "bundle", "install", str(bundle), capture=False)
    after = ask_all(questions)
    corrected = [q for q in questions if not before[q["id"]]["right"]]
    print(f"\ncorrected questions answered exactly: {sum(before[q['id']]['right'] for q in corrected)} of "
          f"{len(corrected)} before, {sum(after[q['id']]['right'] for q in corrected)} after the feedback round "
          f"(builder eval: {result['feedback']['before']['exact_with_retrieval']:.0%} -> "
          f"{result['feedback']['after']['exact_with_retrieval']:.0%})")
    for q in corrected:
        print(f"\n{q['question']}\n  before: {before[q['id']]['answer'][:120]}\n  after:  {after[q['id']]['answer'][:120]}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
