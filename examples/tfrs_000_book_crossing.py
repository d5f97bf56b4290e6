"""TFRS tutorial 000 on twostage: two-tower retrieval on Book-Crossing's
``Preprocessed_data.csv``, predictions for a user, and a saved model that reloads.

    python examples/tfrs_000_book_crossing.py --data Preprocessed_data.csv
    python examples/tfrs_000_book_crossing.py            # a generated file, same layout

The tutorial prints TFRS's factorized top-K accuracy and "Recommendations for user 8:
[titles]"; this prints the same, beside most-popular, with seen items excluded too, and
a rating of 0 read as "interacted, no rating" (``data.unrated_values=0``).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import twostage
from twostage.data.book_crossing import write_book_crossing


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="a Preprocessed_data.csv file")
    parser.add_argument("--rows", type=int, default=20_000, help="rows to generate")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="small, for tests")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="twostage-bx-"))
    data = args.data or write_book_crossing(
        work / "Preprocessed_data.csv", num_rows=3000 if args.quick else args.rows
    )
    config = twostage.apply_overrides(
        twostage.ExperimentConfig(),
        [
            f"data.dataset=book-crossing:{Path(data).resolve()}",
            "data.unrated_values=0",
            f"train.epochs={1 if args.quick else args.epochs}",
        ],
    )
    stages = twostage.fit_two_stage(config, ranking=False)
    run = stages.retrieval
    popular = twostage.evaluate_baselines(
        run, stages.split.test, names=("popularity",)
    )["popularity"].to_dict()
    print("Factorized top-K accuracy on the test split (TFRS's metric):")
    for k in ("1", "5", "10", "50", "100"):
        ours = run.metrics["metrics"]["include_seen"]["factorized_top_k"][k]
        theirs = popular["metrics"]["include_seen"]["factorized_top_k"][k]
        print(f"  top-{k:>3}: twostage {ours:.4f}   most-popular {theirs:.4f}")
    seen = run.metrics["metrics"]["exclude_seen"]
    print(
        f"Seen items excluded: HitRate@10 {seen['hit_rate']['10']:.4f}, "
        f"NDCG@10 {seen['ndcg']['10']:.4f} (most-popular "
        f"{popular['metrics']['exclude_seen']['hit_rate']['10']:.4f}, "
        f"{popular['metrics']['exclude_seen']['ndcg']['10']:.4f})"
    )
    if run.popularity_fallback:
        print(
            f"Users with at most {run.popularity_fallback} books get the most-popular "
            "list (picked on validation)."
        )
    recommender = stages.recommender()
    bundle = recommender.save(work / "models" / "books" / "1")
    reloaded = twostage.load(bundle)
    user = 8 if reloaded.user_vocab.lookup(8) else reloaded.user_vocab.values[0]
    titles = [item["label"] for item in reloaded.recommend(user, k=10).items]
    print(f"Recommendations for user {user}: {titles}")
    return {
        "ftopk100": run.metrics["metrics"]["include_seen"]["factorized_top_k"]["100"],
        "popularity_ftopk100": popular["metrics"]["include_seen"]["factorized_top_k"][
            "100"
        ],
    }


if __name__ == "__main__":
    main()
