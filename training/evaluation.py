"""Caption metrics (pycocoevalcap's BLEU, METEOR, ROUGE-L, CIDEr) and COCO results files.

Scores stay on pycocoevalcap's native 0-1 scale (CIDEr can exceed 1); multiply by 100 only for display.

:func:`evaluate_model` captions a dataset with a :class:`~captioner.api.Captioner` and scores it.

``java_tokenizer=True`` tokenises like the official COCO evaluation (Stanford PTBTokenizer, a Java process);
``java_tokenizer=False`` uses :func:`captioner.vocabulary.tokenize`, which is pure Python and fast: the training
loop scores CIDEr on the validation split that way every epoch. METEOR always needs Java. SPICE is not supported
(it needs Stanford CoreNLP models downloaded at run time); asking for it logs a note and skips it.
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm import tqdm

from captioner.api import Captioner
from captioner.atomic import atomic_write_text
from captioner.batch.records import caption_batches
from captioner.decoding import DecodingOptions
from captioner.errors import CaptionerError
from captioner.vocabulary import tokenize
from training.data import CaptionDataset

log = logging.getLogger(__name__)

METRIC_KEYS: dict[str, tuple[str, ...]] = {
    "bleu": ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"),
    "meteor": ("METEOR",),
    "rouge": ("ROUGE-L",),
    "cider": ("CIDEr",),
}
DEFAULT_METRICS = ("bleu", "meteor", "rouge", "cider")
UNSUPPORTED_METRICS = ("spice",)


class ResultsFileError(CaptionerError, ValueError):
    """A COCO results file is malformed."""


class JavaNotFoundError(CaptionerError, RuntimeError):
    """A metric or the PTB tokenizer needs Java, and there is none."""


def _scorer(metric: str) -> object:
    # Imported when a metric is asked for: most callers need one or two of them.
    if metric == "bleu":
        from pycocoevalcap.bleu.bleu import Bleu

        return Bleu(4)
    if metric == "meteor":
        from pycocoevalcap.meteor.meteor import Meteor

        return Meteor()  # starts a Java process
    if metric == "rouge":
        from pycocoevalcap.rouge.rouge import Rouge

        return Rouge()
    from pycocoevalcap.cider.cider import Cider

    return Cider()


def check_metrics(metrics: Sequence[str], java_tokenizer: bool = True) -> None:
    """Raise now, before any captioning, if a metric is unknown or the request needs Java and there is none."""
    unknown = [m for m in metrics if m not in METRIC_KEYS and m not in UNSUPPORTED_METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown} (expected some of {sorted(METRIC_KEYS)})")
    needs = "METEOR" if "meteor" in metrics else "the PTB tokenizer" if java_tokenizer else None
    if needs and shutil.which("java") is None:
        raise JavaNotFoundError(f"{needs} needs Java, but 'java' is not on PATH: install a JRE, or use the Python "
                                "tokenizer (java_tokenizer=False, --python-tokenizer) and leave out METEOR")


def _tokenize(
    predictions: dict[int, str], references: dict[int, list[str]], java_tokenizer: bool,
) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """Tokenised (space-joined) predictions and references, as pycocoevalcap's scorers take them.

    Raises ValueError when there is nothing to score or a predicted image has no reference.
    """
    if not predictions:
        raise ValueError("no predictions to score")
    unreferenced = [i for i in predictions if not references.get(i)]
    if unreferenced:
        raise ValueError(f"{len(unreferenced)} predicted images have no reference captions (e.g. id {unreferenced[0]})")
    if not java_tokenizer:
        res = {i: [" ".join(tokenize(c))] for i, c in predictions.items()}
        gts = {i: [" ".join(tokenize(c)) for c in references[i]] for i in predictions}
        return res, gts
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # One Java run for both sides: keys ("p", id) for predictions and ("r", id) for references.
    captions = {("p", i): [{"caption": c}] for i, c in predictions.items()}
    captions |= {("r", i): [{"caption": c} for c in references[i]] for i in predictions}
    tokens = PTBTokenizer().tokenize(captions)
    return {i: tokens[("p", i)] for i in predictions}, {i: tokens[("r", i)] for i in predictions}


def compute_metrics(
    predictions: dict[int, str], references: dict[int, list[str]], metrics: Sequence[str] = DEFAULT_METRICS,
    java_tokenizer: bool = True,
) -> dict[str, float]:
    """Corpus scores of one caption per image against its references, over the images in ``predictions``.

    Keys: ``BLEU-1``..``BLEU-4``, ``METEOR``, ``ROUGE-L``, ``CIDEr`` (those of the requested ``metrics``), values
    on the 0-1 scale. Every predicted image needs at least one reference. Note that CIDEr's document frequencies
    come from the scored images' references, so it is only meaningful over many images.
    """
    check_metrics(metrics, java_tokenizer)
    for metric in (m for m in metrics if m in UNSUPPORTED_METRICS):
        log.warning("%s skipped: it needs Stanford CoreNLP models downloaded at run time, which is not supported",
                    metric.upper())
    res, gts = _tokenize(predictions, references, java_tokenizer)
    scores: dict[str, float] = {}
    for metric in (m for m in DEFAULT_METRICS if m in metrics):
        scorer = _scorer(metric)
        if metric == "bleu":
            score, _ = scorer.compute_score(gts, res, verbose=0)
        else:
            score, _ = scorer.compute_score(gts, res)
        del scorer  # METEOR's Java process ends with its scorer
        values = score if isinstance(score, list) else [score]
        scores |= {key: float(value) for key, value in zip(METRIC_KEYS[metric], values, strict=True)}
    return scores


def per_image_cider(
    predictions: dict[int, str], references: dict[int, list[str]], java_tokenizer: bool = True,
) -> dict[int, float]:
    """Each image's CIDEr-D (0-1 scale x10, as pycocoevalcap), tokenised as :func:`compute_metrics` does: their mean
    is the corpus CIDEr it reports. For comparing two models photo by photo (``scripts/paired_bootstrap.py``)."""
    check_metrics(("cider",), java_tokenizer)
    res, gts = _tokenize(predictions, references, java_tokenizer)
    _, scores = _scorer("cider").compute_score(gts, res)
    return {image: float(score) for image, score in zip(gts, scores, strict=True)}


def distinct_caption_share(predictions: dict[int, str]) -> float:
    """The number of distinct captions over the number of images (1.0: every caption is different)."""
    if not predictions:
        return 0.0
    return len({" ".join(tokenize(c)) for c in predictions.values()}) / len(predictions)


# Words a caption cannot end on: articles, conjunctions, possessives, auxiliaries and the prepositions that are never
# a verb's particle ("looks on", "walks by" are whole, so "on" and "by" are not here).
UNFINISHED_ENDINGS = frozenset("a an the and or but of with from into onto for while his its their is are".split())
# Nor on an article and colours with no noun after them ("holding a blue", "playing in a red and white"); a colour
# alone ends a phrase well ("dressed in blue").
COLOURS = frozenset("red blue green yellow black white brown orange pink purple gray grey tan silver gold".split())


def is_unfinished(caption: str) -> bool:
    """Whether a caption stops mid-phrase: empty, on an :data:`UNFINISHED_ENDINGS` word, or on "a/an/the" and
    colours. Such a caption was cut off, by the length limit or by a decoder that learned to stop early (SCST can)."""
    words = tokenize(caption)
    if not words or words[-1] in UNFINISHED_ENDINGS:
        return True
    end = len(words)
    while end > 0 and (words[end - 1] in COLOURS or words[end - 1] == "and"):
        end -= 1
    return end < len(words) and end > 0 and words[end - 1] in ("a", "an", "the")


def has_repeated_pair(caption: str) -> bool:
    """Whether some word pair occurs twice in a caption ("a man riding a bike on a bike"): a decoding loop."""
    pairs = list(itertools.pairwise(tokenize(caption)))
    return len(set(pairs)) < len(pairs)


def _share(predicate: Callable[[str], bool], predictions: dict[int, str]) -> float:
    return sum(map(predicate, predictions.values())) / len(predictions) if predictions else 0.0


def repeated_pair_share(predictions: dict[int, str]) -> float:
    """The share of captions that loop (:func:`has_repeated_pair`)."""
    return _share(has_repeated_pair, predictions)


def unfinished_share(predictions: dict[int, str]) -> float:
    """The share of captions that stop mid-phrase (:func:`is_unfinished`)."""
    return _share(is_unfinished, predictions)


# The measures of caption form an evaluation reports beside the metrics, by key; each is a share of the captions.
FORM_MEASURES = {
    "distinct_caption_share": ("distinct captions (%)", distinct_caption_share),
    "repeated_pair_share": ("repeated word pair (%)", repeated_pair_share),
    "unfinished_share": ("unfinished (%)", unfinished_share),
}


def score_captions(
    predictions: dict[int, str], references: dict[int, list[str]], metrics: Sequence[str] = DEFAULT_METRICS,
    java_tokenizer: bool = True,
) -> dict[str, float]:
    """:func:`compute_metrics` plus the :data:`FORM_MEASURES` of the captions: everything an evaluation reports."""
    scores = compute_metrics(predictions, references, metrics, java_tokenizer)
    scores |= {key: measure(predictions) for key, (_, measure) in FORM_MEASURES.items()}
    return scores


def metric_label(key: str) -> str:
    """How a metrics key is shown next to its value x100."""
    return FORM_MEASURES[key][0] if key in FORM_MEASURES else key


def format_metrics(metrics: dict[str, float]) -> str:
    """A two-column text table of the scores x100 (the form measures as percentages)."""
    lines = [f"{'metric':<24}{'score':>8}"]
    lines += [f"{metric_label(key):<24}{100 * value:>8.2f}" for key, value in metrics.items()]
    return "\n".join(lines)


def write_results(predictions: dict[int, str], path: str | Path) -> Path:
    """Write a COCO results file ``[{"image_id": ..., "caption": ...}]`` (sorted by id) atomically."""
    results = [{"image_id": int(i), "caption": predictions[i]} for i in sorted(predictions)]
    atomic_write_text(path, json.dumps(results, ensure_ascii=False, indent=0))
    return Path(path)


def load_results(path: str | Path) -> dict[int | str, str]:
    """Read and validate a COCO results file: a list of ``{"image_id": ..., "caption": str}``, one per image.

    COCO ids are integers; string ids (what ``captioner caption --format coco`` writes for a file name that is not a
    number) are accepted too and matched to images by :func:`match_results`.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ResultsFileError(f"{path}: cannot read results file ({exc})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ResultsFileError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, list):
        raise ResultsFileError(f"{path}: a results file is a JSON list of {{'image_id', 'caption'}} objects")
    predictions: dict[int | str, str] = {}
    for n, entry in enumerate(data):
        where = f"{path}: entry {n}"
        if not isinstance(entry, dict) or "image_id" not in entry or "caption" not in entry:
            raise ResultsFileError(f"{where}: expected an object with 'image_id' and 'caption'")
        image_id, caption = entry["image_id"], entry["caption"]
        if isinstance(image_id, bool) or not isinstance(image_id, (int, str)):
            raise ResultsFileError(f"{where}: image_id must be an integer (or a file name stem), got {image_id!r}")
        if not isinstance(caption, str):
            raise ResultsFileError(f"{where}: caption must be a string, got {caption!r}")
        if image_id in predictions:
            raise ResultsFileError(f"{where}: image_id {image_id!r} appears more than once (one caption per image)")
        predictions[image_id] = caption
    return predictions


def match_results(results: dict[int | str, str], dataset: CaptionDataset) -> dict[int, str]:
    """Results keyed by the dataset's image ids: integer ids as they are, string ids by image file stem.

    Raises ValueError when an id matches no image of the dataset.
    """
    known = {record.image_id for record in dataset.images}
    by_stem = {record.path.stem: record.image_id for record in dataset.images}
    matched: dict[int, str] = {}
    unknown = []
    for image_id, caption in results.items():
        key = by_stem.get(image_id) if isinstance(image_id, str) else image_id if image_id in known else None
        if key is None:
            unknown.append(image_id)
        elif key in matched:
            raise ValueError(f"two results are for image {key} ({image_id!r} is one of them)")
        else:
            matched[key] = caption
    if unknown:
        raise ValueError(f"{len(unknown)} result image ids match no annotated image (e.g. {unknown[0]!r})")
    return matched


def caption_dataset(
    captioner: Captioner, dataset: CaptionDataset, options: DecodingOptions, batch_size: int = 64,
    num_workers: int = 2, progress: bool = True,
) -> dict[int, str]:
    """The best caption of each image by id; images that cannot be read are logged and left out."""
    paths = [str(record.path) for record in dataset.images]
    records = itertools.chain.from_iterable(caption_batches(captioner, paths, options, batch_size, num_workers))
    predictions: dict[int, str] = {}
    failures: list[dict] = []
    for image, record in tqdm(zip(dataset.images, records, strict=True), total=len(paths), desc="captioning",
                              unit="img", disable=not progress):
        if "error" in record:
            failures.append(record)
        else:
            predictions[image.image_id] = record["caption"]
    if failures:
        log.warning("%d of %d images could not be read and are not scored (first: %s: %s)",
                    len(failures), len(paths), failures[0]["image"], failures[0]["error"])
    return predictions


def evaluate_model(
    captioner: Captioner, dataset: CaptionDataset, options: DecodingOptions, batch_size: int = 64, *,
    metrics: Sequence[str] = DEFAULT_METRICS, java_tokenizer: bool = True, num_workers: int = 2,
    progress: bool = True,
) -> tuple[dict[int, str], dict[str, float]]:
    """Caption every image of ``dataset`` and score the captions against its references.

    Returns the predictions by image id and the :func:`score_captions` scores.
    """
    check_metrics(metrics, java_tokenizer)  # fail before captioning, not after
    predictions = caption_dataset(captioner, dataset, options, batch_size, num_workers, progress)
    if not predictions:
        raise ValueError(f"none of the {len(dataset)} images could be read")
    return predictions, score_captions(predictions, dataset.references(), metrics, java_tokenizer)
