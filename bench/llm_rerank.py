"""Can a packaged language model rerank the facts where the embedders lack world knowledge? A probe
for issue 14's Russian recall: the index's top 5 facts for each question, each scored by the query
likelihood under the model (mean log-probability of the question's tokens after "a fact about me:
<fact> / a question about this fact:", minus the same without the fact: a pointwise mutual
information), added to the index's score with weight w. Prints recall@1 for each w and the time a
query takes.

    python bench/llm_rerank.py [--model gemma3-270m] [--sets heldout_ru tune_ru] [--data-dir DIR]

Not a timed test; nothing is downloaded (the model is a packaged one, converted into DIR once).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.runtime import load_model  # noqa: E402
from bench.retrieval import DATA, SETS  # noqa: E402
from knowledge.embed import make_embedder, resolve  # noqa: E402
from knowledge.facts import normalise  # noqa: E402
from knowledge.index import KnowledgeBase, RetrievalConfig  # noqa: E402

TEMPLATES = {"ru": ("Факт обо мне: {fact}\nВопрос об этом факте: ", "Вопрос: "),
             "en": ("A fact about me: {fact}\nA question about this fact: ", "A question: ")}
WEIGHTS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3-270m", help="base model spec ('' = the packaged SmolLM2)")
    ap.add_argument("--sets", nargs="+", default=["heldout_ru", "tune_ru"], choices=sorted(SETS))
    ap.add_argument("--candidates", type=int, default=5)
    ap.add_argument("--data-dir", type=Path, default=None, help="where the converted model is kept (default: a temporary folder)")
    args = ap.parse_args()
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="doppel-rerank-"))
    model, tok = load_model(args.model, data_dir)
    embedder = make_embedder(resolve(""))
    tmp = Path(tempfile.mkdtemp(prefix="doppel-rerank-index-"))

    def logprob(prefix: str, text: str) -> float:
        a = tok(prefix, add_special_tokens=True)["input_ids"]
        b = tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([a + b])).logits[0, len(a) - 1:-1].float()
        return torch.log_softmax(logits, -1).gather(1, torch.tensor(b)[:, None]).mean().item()

    for set_name in args.sets:
        with_fact, without = TEMPLATES["ru" if set_name.endswith("_ru") else "en"]
        facts_name, questions_name = SETS[set_name]
        facts = tmp / f"{set_name}.md"
        facts.write_text((DATA / facts_name).read_text(encoding="utf-8"), encoding="utf-8")
        kb = KnowledgeBase(facts, tmp / f"{set_name}.index", embedder, RetrievalConfig())
        kb.refresh()
        questions = [json.loads(line) for line in (DATA / questions_name).read_text(encoding="utf-8").splitlines() if line.strip()]
        scored = []
        t0 = time.perf_counter()
        for item in questions:
            wanted = {normalise(w) for w in (item["fact"] if isinstance(item["fact"], list) else [item["fact"]])}
            hits = kb.search(item["q"], top_k=args.candidates, min_score=-1.0, margin=5.0)
            alone = logprob(without, item["q"])
            scored.append((item["q"], wanted, [(h.fact.text, h.score, logprob(with_fact.format(fact=h.fact.text), item["q"]) - alone)
                                               for h in hits]))
        ms = (time.perf_counter() - t0) / len(questions) * 1000
        recall = {w: sum(normalise(max(c, key=lambda x: x[1] + w * x[2])[0]) in wanted for _, wanted, c in scored) / len(scored)
                  for w in WEIGHTS}
        print(f"{set_name}: {len(scored)} questions, {ms:.0f} ms a query (the index's and {args.candidates} model passes); "
              "recall@1 by weight: " + ", ".join(f"{w:g}: {r:.3f}" for w, r in recall.items()), flush=True)
        for q, wanted, c in scored:
            if normalise(c[0][0]) not in wanted:
                print(f"  {q!r}: " + "; ".join(f"{t[:32]!r} {s:.3f} {p:+.2f}" for t, s, p in c[:4]))


if __name__ == "__main__":
    main()
