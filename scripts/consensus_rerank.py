"""Consensus reranking of the beam's captions (minimum Bayes risk decoding) on a validation split: a #15 lever.

Beam search returns the caption the model scores highest; metrics such as CIDEr reward the caption most like what
people say, and a caption that many of the beam's hypotheses agree with is more likely to be that (Devlin et al.
2015's consensus reranking; minimum Bayes risk decoding with a CIDEr-like utility). For each image this script
keeps the beam's ``--beam-sizes`` hypotheses, takes the first ``pool`` of them (best first) and returns the one
with the highest mean similarity to the others in the pool: the cosine of TF-IDF n-gram vectors (n = 1..4, the
document frequencies from ``--idf-annotations``' references, as CIDEr weights n-grams), times CIDEr-D's Gaussian
penalty on the length difference. Pool 1 is the plain beam search.

    .venv/bin/python scripts/consensus_rerank.py --model captioner/models/default \
        --annotations data/flickr8k/captions_dev.json --images ../shared/data/flickr8k/images --beam-sizes 5,10

It decodes with the model's recorded decoding options except the beam size, from the features cache as
``scripts/tune_decoding.py`` does, and prints the scores of each (beam, pool) pair (Python tokenizer; ``--official``
for the Java tokenizer and METEOR).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captioner.checkpoint import load_model  # noqa: E402
from captioner.decoding import DecodingOptions, decode  # noqa: E402
from captioner.vocabulary import tokenize  # noqa: E402
from training.evaluation import compute_metrics, distinct_caption_share  # noqa: E402
from training.features import cached_split  # noqa: E402

MAX_N = 4
LENGTH_SIGMA = 6.0  # CIDEr-D's


def _ngrams(words: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


class Similarity:
    """CIDEr-like similarity of two captions: TF-IDF n-gram cosines (n = 1..4) averaged, times a length penalty."""

    def __init__(self, reference_sets: Iterable[Sequence[str]]) -> None:
        """``reference_sets``: one set of reference captions per image (an n-gram's document is an image)."""
        self.df: Counter[tuple[str, ...]] = Counter()
        images = 0
        for captions in reference_sets:
            images += 1
            seen: set[tuple[str, ...]] = set()
            for caption in captions:
                words = tokenize(caption)
                for n in range(1, MAX_N + 1):
                    seen |= set(_ngrams(words, n))
            self.df.update(seen)
        self.log_images = math.log(max(images, 1))

    def vectors(self, words: Sequence[str]) -> list[tuple[dict[tuple[str, ...], float], float]]:
        """Per n, the TF-IDF vector of ``words`` and its norm."""
        out = []
        for n in range(1, MAX_N + 1):
            vector = {g: c * (self.log_images - math.log(max(1.0, self.df[g]))) for g, c in _ngrams(words, n).items()}
            out.append((vector, math.sqrt(sum(x * x for x in vector.values())) or 1.0))
        return out

    def __call__(self, a: Sequence[str], b: Sequence[str]) -> float:
        """The similarity of two tokenised captions, 0 (nothing shared) to 1 (the same)."""
        total = 0.0
        for (va, na), (vb, nb) in zip(self.vectors(a), self.vectors(b), strict=True):
            total += sum(x * vb.get(g, 0.0) for g, x in va.items()) / (na * nb)
        return total / MAX_N * math.exp(-((len(a) - len(b)) ** 2) / (2 * LENGTH_SIGMA**2))


def consensus(captions: Sequence[str], similarity: Similarity) -> str:
    """The caption with the highest mean similarity to the others (the first of equals; the only one if alone)."""
    if len(captions) < 2:
        return captions[0]
    words = [tokenize(c) for c in captions]
    means = [
        sum(similarity(words[i], words[j]) for j in range(len(words)) if j != i) / (len(words) - 1)
        for i in range(len(words))
    ]
    return captions[max(range(len(captions)), key=means.__getitem__)]


def main(argv: list[str] | None = None) -> None:
    """Print the scores of each beam size and pool (the command line when ``argv`` is None)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--annotations", required=True)
    parser.add_argument("--images", default="")
    parser.add_argument("--idf-annotations", default="data/flickr8k/captions_train.json",
                        help="COCO-style annotations whose references give the n-grams' document frequencies")
    parser.add_argument("--cache-dir", default="cache/features")
    parser.add_argument("--beam-sizes", default="5,10")
    parser.add_argument("--pools", default="1,3,5,7,10", help="how many of the best hypotheses vote (1: plain beam)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--official", action="store_true", help="all metrics, Java PTB tokenizer and METEOR (slower)")
    args = parser.parse_args(argv)
    metrics = ("bleu", "meteor", "rouge", "cider") if args.official else ("bleu", "cider")

    model = load_model(args.model, allow_download=False)
    split = cached_split(model, args.annotations, args.images or None, args.cache_dir)
    dataset, rows, references = split.dataset, split.rows, split.references
    idf = json.loads(Path(args.idf_annotations).read_text())["annotations"]
    by_image: dict[int, list[str]] = {}
    for annotation in idf:
        by_image.setdefault(annotation["image_id"], []).append(annotation["caption"])
    similarity = Similarity(by_image.values())
    recorded = DecodingOptions.from_recorded(model.decoding)
    print(f"{'beam':>4} {'pool':>4} " + " ".join(f"{m:>7}" for m in ("BLEU-4", "METEOR", "CIDEr", "distinct")))
    for beam in (int(x) for x in args.beam_sizes.split(",")):
        options = replace(recorded, strategy="beam", beam_size=beam, num_captions=beam)
        candidates: dict[int, list[str]] = {}
        for i in range(0, len(rows), args.batch_size):
            batch = rows[i : i + args.batch_size]
            for row, hyps in zip(batch, decode(model.decoder, split.grids(batch), model.vocab, options), strict=True):
                candidates[dataset.images[row].image_id] = [model.vocab.decode(h.tokens) for h in hyps]
        for pool in (int(x) for x in args.pools.split(",")):
            if pool > beam:
                continue
            chosen = {i: consensus(c[:pool], similarity) for i, c in candidates.items()}
            scores = compute_metrics(chosen, references, metrics=metrics, java_tokenizer=args.official)
            values = " ".join(f"{scores[k] * 100:>7.2f}" if k in scores else f"{'-':>7}"
                              for k in ("BLEU-4", "METEOR", "CIDEr"))
            print(f"{beam:>4} {pool:>4} {values} {distinct_caption_share(chosen) * 100:>7.1f}%", flush=True)


if __name__ == "__main__":
    main()
