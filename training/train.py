"""The training loop: cross-entropy with teacher forcing, CIDEr-based model selection, resume, DDP.

Plain PyTorch, no framework: read ``train`` at the end, then the steps it calls (:func:`set_up`, :func:`xe_epoch`,
:func:`scst_epoch`, :func:`end_of_epoch`), each a section of this file. One epoch visits every (image, caption) pair
once in a seeded order; after every ``eval_every`` epochs the model captions the validation images with real decoding
(the same ``decode`` the service uses) and the checkpoint with the best CIDEr is kept in ``best/``. ``last/`` holds
the newest weights and the trainer state (optimizer, schedule, RNG), so ``--resume`` continues exactly.

Run directory layout::

    OUT/config.toml     effective configuration
    OUT/best/           best model by validation CIDEr (a model directory: load with Captioner.load)
    OUT/last/           newest model + trainer_state.pt
    OUT/log.jsonl       one line per epoch (losses, metrics, times)
    OUT/curves.png      training curves
    OUT/tensorboard/    TensorBoard scalars
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from captioner.atomic import atomic_write_bytes, atomic_write_text
from captioner.checkpoint import CaptionModel, load_model, read_config, save_model
from captioner.decoding import decode
from captioner.distributed import Launch, average_gradients, barrier, broadcast_from_main, init_distributed
from captioner.encoder import Encoder, build_encoder, get_backbone
from captioner.model import CaptionDecoder, masked_cross_entropy
from captioner.preprocess import PreprocessConfig
from captioner.tags import TagHead
from captioner.vocabulary import Vocabulary
from training.config import Config, EncoderConfig
from training.data import CaptionDataset, first_images, load_coco
from training.evaluation import compute_metrics, format_metrics, score_captions
from training.features import FeatureCache, TopOfTrunk, build_feature_cache
from training.report import plot_curves
from training.scst import CiderD, scst_loss
from training.scst import check_baseline as check_scst_baseline
from training.tag_head import refit_tag_head

log = logging.getLogger(__name__)
TRAINER_STATE = "trainer_state.pt"
# The decoding options a trained model records as its defaults (config.json "decoding").
RECORDED_DECODING = ("strategy", "beam_size", "max_length", "length_penalty", "no_repeat_ngram_size")


# ----------------------------------------------------------------------------------------------------------------
# Data: (image, caption) pairs whose image side is a cached grid (or the frozen trunk's output, when fine-tuning).


def encode_captions(
    dataset: CaptionDataset, vocab: Vocabulary, max_words: int, usable: set[int]
) -> tuple[Tensor, Tensor]:
    """All (image row, padded token ids) training pairs of a dataset; rows not in ``usable`` are skipped."""
    rows, sequences = [], []
    for row, record in enumerate(dataset.images):
        if row not in usable:
            continue
        for caption in record.captions:
            ids = vocab.encode(caption, max_words)
            if len(ids) > 2:
                rows.append(row)
                sequences.append(ids)
    tokens = torch.full((len(sequences), max_words + 2), vocab.pad, dtype=torch.long)
    for i, ids in enumerate(sequences):
        tokens[i, : len(ids)] = torch.tensor(ids)
    return torch.tensor(rows, dtype=torch.long), tokens


class CaptionPairs(Dataset):
    """Index i -> (image features, tokens): the cached grid of the pair's image (the trunk's output when fine-tuning).

    With a ``mirror_cache`` (the grids of the horizontally flipped images), :meth:`choose_mirrored` draws, for each
    epoch, which pairs read their image's mirrored grid instead: a seeded coin per pair, so a resumed or distributed
    run makes the same choices.
    """

    def __init__(
        self, rows: Tensor, tokens: Tensor, cache: FeatureCache, mirror_cache: FeatureCache | None = None
    ) -> None:
        self.rows, self.tokens, self.cache, self.mirror_cache = rows, tokens, cache, mirror_cache
        self.mirrored = torch.zeros(len(rows), dtype=torch.bool)

    def choose_mirrored(self, seed: int, epoch: int) -> None:
        """Draw this epoch's pairs that use the mirrored grid (half of them, on average)."""
        if self.mirror_cache is not None:
            generator = torch.Generator().manual_seed(seed * 100_003 + epoch + 50_000)
            self.mirrored = torch.rand(len(self.rows), generator=generator) < 0.5

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        row = int(self.rows[index])
        cache = self.mirror_cache if self.mirrored[index] else self.cache
        return torch.from_numpy(np.array(cache.features[row], dtype=np.float32)), self.tokens[index]


def epoch_batches(
    num_pairs: int, batch_size: int, seed: int, epoch: int, rank: int, world: int, lengths: Tensor | None = None,
) -> list[list[int]]:
    """This rank's batches of pair indices for an epoch: a seeded permutation, split across ranks.

    With ``lengths``, pairs are bucketed: each window of 50 batches is sorted by caption length before it is cut
    into batches, and the batches are shuffled again. Batches then hold captions of similar length, so little time
    goes into padding, while every epoch still sees a fresh random mix.
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(num_pairs, generator=generator)
    order = order[: len(order) - len(order) % world][rank::world]  # equal share per rank
    if lengths is not None:
        window = batch_size * 50
        chunks = [order[i : i + window] for i in range(0, len(order), window)]
        order = torch.cat([chunk[lengths[chunk].argsort(stable=True)] for chunk in chunks])
    batches = [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    if lengths is not None:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


# ----------------------------------------------------------------------------------------------------------------
# Loss


def sample_prob(config: Config, epoch: int) -> float:
    """Scheduled sampling's probability in cross-entropy epoch ``epoch`` (1-based): 0 at first, the maximum last."""
    top, epochs = config.train.scheduled_sampling, config.train.epochs
    return 0.0 if epochs <= 1 else top * (epoch - 1) / (epochs - 1)


def caption_loss(
    decoder: nn.Module, grid: Tensor, tokens: Tensor, config: Config, pad: int, sampling: float = 0.0
) -> Tensor:
    """Masked cross-entropy of teacher-forced predictions plus the doubly stochastic attention penalty.

    ``sampling``: scheduled sampling's probability of feeding the decoder's own previous word (see ``sample_prob``).
    """
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    logits, alphas = decoder(grid, inputs, sampling)
    loss = masked_cross_entropy(logits, targets, pad, config.train.label_smoothing)
    if alphas is not None and config.train.attention_penalty > 0:
        mask = (targets != pad).unsqueeze(2).float()
        # Every image region should receive about one unit of attention over the whole caption.
        coverage = (alphas * mask).sum(dim=1)
        loss = loss + config.train.attention_penalty * ((1.0 - coverage) ** 2).mean()
    return loss


def tbptt_backward(decoder: CaptionDecoder, grid: Tensor, tokens: Tensor, config: Config, pad: int) -> float:
    """Truncated backprop: forward the whole caption, backpropagate within chunks of ``tbptt`` steps.

    The recurrent state crosses chunk boundaries forward (detached), gradients do not. Returns the mean loss.
    """
    chunk, inputs_all, targets_all = config.train.tbptt, tokens[:, :-1], tokens[:, 1:]
    total_tokens = int((targets_all != pad).sum())
    _, state = decoder.memory_and_state(grid)
    total = 0.0
    for start in range(0, tokens.size(1) - 1, chunk):
        inputs, targets = inputs_all[:, start : start + chunk], targets_all[:, start : start + chunk]
        n = int((targets != pad).sum())
        if n == 0:
            break
        memory, fresh_state = decoder.memory_and_state(grid)  # recompute per chunk: chunk graphs stay independent
        state = fresh_state if start == 0 else tuple(s.detach() for s in state)
        logits, state, alphas = decoder.forward_from(inputs, state, memory)
        loss = masked_cross_entropy(logits, targets, pad, config.train.label_smoothing) * (n / total_tokens)
        if alphas is not None and config.train.attention_penalty > 0:
            # Chunked form of the coverage penalty: each chunk pushes its share of the attention budget.
            coverage = (alphas * (targets != pad).unsqueeze(2).float()).sum(dim=1)
            loss = loss + config.train.attention_penalty * ((n / total_tokens - coverage) ** 2).mean()
        loss.backward()
        total += float(loss.detach())
    return total


# ----------------------------------------------------------------------------------------------------------------
# Validation


def validate(
    decoder: CaptionDecoder,
    vocab: Vocabulary,
    cache: FeatureCache | TopOfTrunk,
    dataset: CaptionDataset,
    config: Config,
    device: torch.device,
    metrics: tuple[str, ...] = ("cider", "bleu"),
) -> tuple[dict[str, float], dict[int, str]]:
    """Caption the validation images with real decoding; returns pycocoevalcap scores and the predictions."""
    e = config.eval
    rows = [r for r in range(len(dataset.images)) if r not in cache.failed]
    if e.max_images:
        rows = rows[: e.max_images]
    was_training = decoder.training
    decoder.eval()
    predictions: dict[int, str] = {}
    for i in range(0, len(rows), e.batch_size):
        batch = rows[i : i + e.batch_size]
        hyps = decode(decoder, cache.grids(batch).to(device), vocab, config.decoding)
        for row, hyp in zip(batch, hyps, strict=True):
            predictions[dataset.images[row].image_id] = vocab.decode(hyp[0].tokens)
    decoder.train(was_training)
    if not metrics:
        return {}, predictions
    references = {dataset.images[r].image_id: dataset.images[r].captions for r in rows}
    return compute_metrics(predictions, references, metrics=metrics, java_tokenizer=False), predictions


# ----------------------------------------------------------------------------------------------------------------
# Set-up: everything the epochs share


@dataclass
class Run:
    """A training run's state: made once by :func:`set_up`, then read and advanced by each epoch."""

    config: Config
    out: Path
    launch: Launch
    device: torch.device
    train_set: CaptionDataset
    val_set: CaptionDataset
    vocab: Vocabulary
    train_cache: FeatureCache  # the encoder's grids, or its frozen trunk's output when fine-tuning
    val_cache: FeatureCache  # the same for the validation images
    pairs: CaptionPairs
    usable: set[int]  # training images whose features could be computed
    encoder: nn.Module
    decoder: CaptionDecoder
    model: CaptionModel  # what best/ and last/ save: the encoder, the trained decoder and the vocabulary
    ema: AveragedModel | None  # the moving average of the decoder weights, when train.ema_decay > 0
    net: nn.Module  # the decoder, wrapped in DistributedDataParallel under torchrun
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    progress: dict  # epoch, step, stage, best CIDEr, ...: saved in last/ for --resume
    writer: Any  # TensorBoard SummaryWriter on rank 0, else None
    use_amp: bool
    started: float
    cider: CiderD | None = None  # SCST's reward, built at the first SCST epoch

    @property
    def fine_tune(self) -> bool:
        return self.config.encoder.fine_tune_blocks > 0

    def grids(self, cache: FeatureCache) -> FeatureCache | TopOfTrunk:
        """``cache`` read as the encoder's grids: through the fine-tuned blocks as they are now, when there are any."""
        return TopOfTrunk(cache, self.encoder) if self.fine_tune else cache

    @property
    def evaluated(self) -> nn.Module:
        """The weights validation scores and best/ keeps: the moving average when there is one."""
        return self.ema.module if self.ema is not None else self.decoder


def check_config(config: Config, launch: Launch) -> None:
    """Refuse combinations that cannot work now, rather than after hours of training."""
    if launch.world > 1 and config.train.tbptt:
        raise ValueError("train.tbptt is not supported under torchrun (DistributedDataParallel); set it to 0")
    if not 0.0 <= config.train.ema_decay < 1.0:
        raise ValueError(f"train.ema_decay must be in [0, 1), got {config.train.ema_decay}")
    if not 0.0 <= config.train.scheduled_sampling <= 1.0:
        raise ValueError(f"train.scheduled_sampling must be in [0, 1], got {config.train.scheduled_sampling}")
    if config.train.scheduled_sampling and config.train.tbptt:
        raise ValueError("train.scheduled_sampling does not work with train.tbptt; set one of them to 0")
    check_scst_baseline(config.scst.baseline, config.scst.samples)


def _lr_lambda(config: Config, total_steps: int):  # noqa: ANN202 - LambdaLR factor function
    t = config.train

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - t.warmup_steps) / max(1, total_steps - t.warmup_steps))
        return t.lr_min_ratio + (1 - t.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def warn_if_warmup_too_long(warmup_steps: int, total_steps: int) -> bool:
    """Log a warning (and return True) when the warm-up is longer than the run: the learning rate never reaches
    train.lr, which a short trial run would otherwise do silently."""
    if warmup_steps <= total_steps:
        return False
    log.warning("train.warmup_steps = %d but the run has only %d optimizer steps: the learning rate never reaches "
                "train.lr (it peaks at %.0f%% of it); lower it, e.g. --set train.warmup_steps=%d", warmup_steps,
                total_steps, 100 * total_steps / warmup_steps, max(1, total_steps // 10))
    return True


def make_optimizer(
    config: Config, decoder: nn.Module, encoder: nn.Module, stage: str, steps_per_epoch: int,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW and its schedule: warm-up then cosine on the decoder (and fine-tuned encoder blocks) for cross-entropy;
    a small constant learning rate, decoder only, for SCST."""
    if stage == "scst":
        optimizer = torch.optim.AdamW(decoder.parameters(), lr=config.scst.lr, weight_decay=config.train.weight_decay)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    groups = [{"params": list(decoder.parameters()), "lr": config.train.lr}]
    if config.encoder.fine_tune_blocks > 0:
        groups.append({"params": [p for p in encoder.parameters() if p.requires_grad], "lr": config.train.encoder_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=config.train.weight_decay)
    schedule = _lr_lambda(config, steps_per_epoch * config.train.epochs)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def set_up(config: Config, out: Path, resume: bool) -> Run:
    """Devices, data, vocabulary, feature caches, model, optimizer; restored from ``out/last`` with ``resume``."""
    device_type = config.train.device
    if device_type == "auto":
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    launch = init_distributed(device_type)
    device = torch.device("cuda", launch.local_rank) if device_type == "cuda" else torch.device(device_type)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    check_config(config, launch)
    started = time.time()
    torch.manual_seed(config.train.seed)
    np.random.seed(config.train.seed)

    # --- data and vocabulary (from the training split only)
    train_set = first_images(load_coco(config.data.train_annotations, config.data.images), config.data.max_images)
    val_set = first_images(load_coco(config.data.val_annotations, config.data.images), config.data.max_images)
    if resume and (out / "last" / "config.json").is_file():
        vocab = Vocabulary.from_json(read_config(out / "last")["vocabulary"])
    else:
        vocab = Vocabulary.build((c for r in train_set.images for c in r.captions), config.data.min_word_count)
    log.info("vocabulary: %d words (min count %d)", len(vocab), config.data.min_word_count)

    # --- encoder and features
    backbone = get_backbone(config.encoder.name)  # its input normalisation goes with the encoder
    preprocess_config = dataclasses.replace(config.preprocess, mean=backbone.mean, std=backbone.std)
    encoder, tagger = training_encoder(config.encoder, preprocess_config)
    fine_tune = config.encoder.fine_tune_blocks > 0

    def cache_for(dataset: CaptionDataset, mirrored: bool = False) -> FeatureCache:
        # Fine-tuning caches the frozen blocks' output; each step runs the blocks it trains (Encoder.top).
        return build_feature_cache(
            encoder,
            preprocess_config,
            [r.path for r in dataset.images],
            config.train.cache_dir,
            config.train.cache_dtype,
            workers=config.train.workers,
            device=str(device),
            mirrored=mirrored,
            trunk=fine_tune,
        )

    # Rank 0 fills the cache first; the other ranks then read the finished entry.
    if not launch.main:
        barrier(launch)
    val_cache = cache_for(val_set)
    train_cache = cache_for(train_set)
    mirror_cache = cache_for(train_set, mirrored=True) if config.train.mirror_images else None
    if launch.main:
        barrier(launch)
    usable = set(range(len(train_set.images))) - train_cache.failed
    rows, tokens = encode_captions(train_set, vocab, config.data.max_caption_length, usable)
    pairs = CaptionPairs(rows, tokens, train_cache, mirror_cache)
    log.info("training pairs: %d captions of %d images", len(pairs), len(usable))

    # --- model, optimizer, schedule
    decoder = CaptionDecoder(
        dataclasses.replace(config.model, vocab_size=len(vocab), feature_dim=encoder.channels)
    ).to(device)
    encoder.to(device)
    model = CaptionModel(
        encoder, decoder, vocab, preprocess_config, name=config.output.name, version=config.output.version,
        tagger=tagger,
    )
    # Polyak averaging: validation and best/ use the moving average of the weights, last/ the trained weights.
    ema = None
    if config.train.ema_decay:
        ema = AveragedModel(decoder, multi_avg_fn=get_ema_multi_avg_fn(config.train.ema_decay), use_buffers=True)
    steps_per_epoch = math.ceil(len(pairs) // launch.world / config.train.batch_size)
    warn_if_warmup_too_long(config.train.warmup_steps, steps_per_epoch * config.train.epochs)
    progress = {"epoch": 0, "step": 0, "stage": "xe", "best_cider": -1.0, "bad_evals": 0, "history": [], "seconds": 0.0}
    state = None
    if resume and (out / "last" / TRAINER_STATE).is_file():
        last = load_model(out / "last")
        decoder.load_state_dict(last.decoder.state_dict())
        if fine_tune:
            encoder.load_state_dict(last.encoder.state_dict())
        state = torch.load(out / "last" / TRAINER_STATE, map_location="cpu", weights_only=True)
        progress = state["progress"]
    optimizer, scheduler = make_optimizer(config, decoder, encoder, progress["stage"], steps_per_epoch)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if ema is not None:
            if "ema" not in state:
                raise ValueError(f"{out / 'last'} was trained without train.ema_decay; resume with the same config")
            ema.load_state_dict(state["ema"])
        log.info("resuming after epoch %d (step %d)", progress["epoch"], progress["step"])
    elif launch.main:
        out.mkdir(parents=True, exist_ok=True)
    writer = None
    if launch.main:
        atomic_write_text(out / "config.toml", config.to_toml())
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tensorboard"))
    return Run(
        config=config, out=out, launch=launch, device=device, train_set=train_set, val_set=val_set, vocab=vocab,
        train_cache=train_cache, val_cache=val_cache, pairs=pairs, usable=usable, encoder=encoder, decoder=decoder,
        model=model, ema=ema, net=DistributedDataParallel(decoder) if launch.world > 1 else decoder,
        optimizer=optimizer, scheduler=scheduler, progress=progress, writer=writer,
        use_amp=(config.train.amp and device.type == "cuda") or (config.train.amp_on_cpu and cpu_bf16_is_fast(device)),
        started=started,
    )


def training_encoder(config: EncoderConfig, preprocess: PreprocessConfig) -> tuple[Encoder, TagHead | None]:
    """The run's encoder: the pretrained one (its last ``fine_tune_blocks`` to train), or ``from_model``'s, frozen,
    with that model's tags classifier (None: a pretrained encoder's, found at load time).

    A model's encoder only computes the grids it was trained to on the images it was trained on, so the run's
    encoder name and preprocessing must be that model's.
    """
    if not config.from_model:
        encoder = build_encoder(
            config.name, weights_path=config.weights or None, fine_tune_blocks=config.fine_tune_blocks
        )
        return encoder, None
    source = load_model(config.from_model)
    if source.encoder.name != config.name:
        raise ValueError(
            f"encoder.from_model {config.from_model} has encoder {source.encoder.name!r}, the config {config.name!r}"
        )
    if source.preprocess != preprocess:
        raise ValueError(
            f"encoder.from_model {config.from_model} preprocesses images as {source.preprocess}, this run as "
            f"{preprocess}: its encoder was trained on its own input"
        )
    # Its record of fine-tuned blocks stays (the features cache keys such an encoder by its tensors); nothing trains.
    return source.encoder.requires_grad_(False).eval(), source.tagger


def cpu_bf16_is_fast(device: torch.device) -> bool:
    """Whether bfloat16 autocast pays off on ``device`` (a CPU with native bfloat16 matmuls: AVX-512 BF16 or AMX).

    Without them PyTorch emulates bfloat16 and a matmul runs ~200x slower than in float32 (measured on an AVX2
    EPYC: 0.25 vs 48 GFLOP/s), so ``train.amp_on_cpu`` is ignored there, with a warning, rather than turning a
    40-minute run into days.
    """
    if device.type != "cpu":
        return False
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return True
    log.warning(
        "train.amp_on_cpu is set but this CPU (%s) has no native bfloat16 matmuls: training in float32",
        torch.backends.cpu.get_cpu_capability(),
    )
    return False


# ----------------------------------------------------------------------------------------------------------------
# One epoch of each stage


def optimizer_step(run: Run, sync: bool) -> None:
    """Clip the gradient norm and step; ``sync`` averages gradients across ranks (when DDP did not already).

    The moving average, if any, then takes in the decoder's new weights.
    """
    parameters = [p for group in run.optimizer.param_groups for p in group["params"] if p.grad is not None]
    if sync:
        average_gradients(parameters, run.launch)
    torch.nn.utils.clip_grad_norm_(parameters, run.config.train.grad_clip)
    run.optimizer.step()
    run.scheduler.step()
    if run.ema is not None:
        run.ema.update_parameters(run.decoder)
    run.progress["step"] += 1


def report_step(run: Run, bar: tqdm, shown: dict[str, str], scalars: dict[str, float]) -> None:
    """A step's figures: ``shown`` on the progress bar, ``scalars`` in TensorBoard (rank 0)."""
    bar.set_postfix(shown)
    if run.writer is not None:
        for name, value in scalars.items():
            run.writer.add_scalar(name, value, run.progress["step"])


def xe_epoch(run: Run, epoch: int, total_epochs: int) -> list[float]:
    """One cross-entropy epoch with teacher forcing over every (image, caption) pair; returns the batch losses."""
    config, pad = run.config, run.vocab.pad
    batches = epoch_batches(
        len(run.pairs), config.train.batch_size, config.train.seed, epoch, run.launch.rank, run.launch.world,
        lengths=(run.pairs.tokens != pad).sum(dim=1) if config.train.bucket_by_length else None,
    )
    run.pairs.choose_mirrored(config.train.seed, epoch)
    loader = DataLoader(run.pairs, batch_sampler=batches)  # memory-mapped rows: no worker processes needed
    bar = tqdm(loader, desc=f"epoch {epoch}/{total_epochs} xe", disable=not run.launch.main, unit="batch")
    losses = []
    for images, tokens in bar:
        images, tokens = images.to(run.device, non_blocking=True), tokens.to(run.device)
        tokens = tokens[:, : int((tokens != pad).sum(1).max())]  # trim padding
        run.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.use_amp):
            grid = run.encoder.top(images) if run.fine_tune else images  # the trunk's output, when fine-tuning
            if config.train.tbptt:
                loss_value = tbptt_backward(run.decoder, grid, tokens, config, pad)
            else:
                loss = caption_loss(run.net, grid, tokens, config, pad, sample_prob(config, epoch))
                loss.backward()
                loss_value = float(loss.detach())
        if run.fine_tune:  # DistributedDataParallel wraps the decoder: the encoder's trained blocks are averaged here
            average_gradients(run.encoder.parameters(), run.launch)
        optimizer_step(run, sync=False)
        losses.append(loss_value)
        lr = run.scheduler.get_last_lr()[0]
        report_step(run, bar, {"loss": f"{loss_value:.3f}", "lr": f"{lr:.2e}"},
                    {"train/loss": loss_value, "train/lr": lr})
    return losses


def start_scst(run: Run) -> None:
    """Self-critical training starts from the best cross-entropy weights, with a fresh optimizer.

    When fine-tuning, the best epoch's encoder too: SCST trains the decoder only, on the grids of the encoder the
    best decoder was trained with (not the last epoch's, which ``best/`` would then ship beside it).
    """
    if (run.out / "best").is_dir():
        best = load_model(run.out / "best")
        run.decoder.load_state_dict(best.decoder.state_dict())
        if run.fine_tune:
            run.encoder.load_state_dict(best.encoder.state_dict())
    if run.ema is not None:  # the average restarts from the weights SCST starts from
        run.ema.module.load_state_dict(run.decoder.state_dict())
    run.optimizer, run.scheduler = make_optimizer(run.config, run.decoder, run.encoder, "scst", 0)
    run.progress["stage"], run.progress["bad_evals"] = "scst", 0


def scst_epoch(run: Run, epoch: int, total_epochs: int) -> list[float]:
    """One self-critical epoch over the training images (CIDEr-D reward); returns the batch losses."""
    config = run.config
    if run.cider is None:
        end_token = run.vocab.words[run.vocab.end] if config.scst.reward_end else None
        run.cider = CiderD({r.image_id: r.captions for r in run.train_set.images}, end_token=end_token)
    image_rows = sorted(run.usable)
    batches = epoch_batches(
        len(image_rows), config.scst.batch_size, config.train.seed, epoch, run.launch.rank, run.launch.world
    )
    bar = tqdm(batches, desc=f"epoch {epoch}/{total_epochs} scst", disable=not run.launch.main, unit="batch")
    losses = []
    for batch in bar:
        rows = [image_rows[i] for i in batch]
        grid = run.grids(run.train_cache).grids(rows).to(run.device)  # SCST trains the decoder only
        run.optimizer.zero_grad(set_to_none=True)
        loss, reward, baseline = scst_loss(
            run.decoder,
            grid,
            [run.train_set.images[r].image_id for r in rows],
            run.vocab,
            run.cider,
            config.scst.samples,
            config.scst.max_length,
            config.scst.baseline,
        )
        loss.backward()
        optimizer_step(run, sync=True)
        losses.append(float(loss.detach()))
        shown, scalars = {"reward": f"{reward:.3f}"}, {"scst/sample_reward": reward}
        if config.scst.baseline == "greedy":  # the mean of the other samples' means is the mean reward itself
            shown["greedy"], scalars["scst/baseline_reward"] = f"{baseline:.3f}", baseline
        report_step(run, bar, shown, scalars)
    return losses


# ----------------------------------------------------------------------------------------------------------------
# End of epoch: validate, keep the best, save last/, log


def _save_last(run: Run) -> None:
    save_model(run.model, run.out / "last")
    state = {
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "progress": run.progress,
    }
    if run.ema is not None:
        state["ema"] = run.ema.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(run.out / "last" / TRAINER_STATE, buffer.getvalue())


def end_of_epoch(run: Run, epoch: int, stage: str, losses: list[float], epoch_start: float) -> bool:
    """Validate when due, keep the best weights, save ``last/`` and the log (rank 0); returns whether to stop early.

    Every rank gets rank 0's decision.
    """
    config, progress = run.config, run.progress
    total_epochs = config.train.epochs + config.scst.epochs
    entry: dict = {
        "epoch": epoch,
        "stage": stage,
        "train_loss": float(np.mean(losses)),
        "epoch_seconds": time.time() - epoch_start,
    }
    progress["epoch"] = epoch
    stop = False
    if not run.launch.main:
        progress["history"].append(entry)
        return broadcast_from_main(stop, run.launch)
    improved = False
    if epoch % config.train.eval_every == 0 or epoch in (config.train.epochs, total_epochs):
        eval_start = time.time()
        scores, _ = validate(run.evaluated, run.vocab, run.grids(run.val_cache), run.val_set, config, run.device)
        entry["val"] = scores
        if run.ema is not None:  # the trained weights too, to show what the averaging adds
            entry["val_trained_weights"], _ = validate(run.decoder, run.vocab, run.grids(run.val_cache), run.val_set,
                                                       config, run.device)
        entry["eval_seconds"] = time.time() - eval_start
        for key, value in scores.items():
            run.writer.add_scalar(f"val/{key}", value, epoch)
        if scores["CIDEr"] > progress["best_cider"]:
            progress["best_cider"], progress["bad_evals"], improved = scores["CIDEr"], 0, True
        else:
            progress["bad_evals"] += 1
        stop = progress["bad_evals"] >= config.train.patience
    progress["seconds"] += time.time() - epoch_start
    progress["history"].append(entry)
    run.model.training = {
        "epochs": epoch,
        "steps": progress["step"],
        "seconds": round(progress["seconds"], 1),
        "device": str(run.device),
        "world_size": run.launch.world,
        "config": config.to_dict(),
    }
    run.model.decoding = {key: getattr(config.decoding, key) for key in RECORDED_DECODING}
    if improved:
        run.model.metrics = {"val": scores, "epoch": epoch, "stage": stage}
        save_model(dataclasses.replace(run.model, decoder=run.evaluated), run.out / "best")
    _save_last(run)
    with open(run.out / "log.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")
    plot_curves(progress["history"], run.out / "curves.png")
    val_text = " ".join(f"{k}={v * 100:.1f}" for k, v in entry.get("val", {}).items())
    log.info("epoch %d (%s): loss %.3f, %.0fs %s", epoch, stage, entry["train_loss"], entry["epoch_seconds"], val_text)
    return broadcast_from_main(stop, run.launch)


# ----------------------------------------------------------------------------------------------------------------
# The loop


def train(config: Config, out: str | Path, resume: bool = False) -> Path:
    """Train a model as ``config`` says, writing the run directory ``out``; returns the best model's directory."""
    run = set_up(config, Path(out), resume)
    total_epochs = config.train.epochs + config.scst.epochs
    while run.progress["epoch"] < total_epochs:
        epoch = run.progress["epoch"] + 1
        stage = "xe" if epoch <= config.train.epochs else "scst"
        if stage == "scst" and run.progress["stage"] != "scst":
            start_scst(run)
        epoch_start = time.time()
        run.net.train()
        run.encoder.train(run.fine_tune)
        losses = xe_epoch(run, epoch, total_epochs) if stage == "xe" else scst_epoch(run, epoch, total_epochs)
        if end_of_epoch(run, epoch, stage, losses, epoch_start):
            log.info("early stopping (%s): no CIDEr improvement in %d evaluations", stage, config.train.patience)
            if stage == "scst" or config.scst.epochs == 0:
                break
            run.progress["epoch"] = config.train.epochs  # go on with the SCST stage

    if run.writer is not None:
        run.writer.close()
    if run.launch.main and (run.out / "best").is_dir():
        # A fine-tuned encoder's grid no longer reads well through the pretrained classifier (training/tag_head.py)
        refit_tags_on = run.train_cache if run.fine_tune else None
        final_evaluation(run.out / "best", config, run.val_set, run.device, time.time() - run.started, refit_tags_on)
    barrier(run.launch)
    log.info("training finished in %.0fs", time.time() - run.started)
    return run.out / "best"


def final_evaluation(
    best_dir: Path, config: Config, val_set: CaptionDataset, device: torch.device, seconds: float,
    refit_tags_on: FeatureCache | None = None,
) -> None:
    """Score the best model on the validation split (and the test split, if configured) with every metric.

    With ``refit_tags_on`` (a fine-tuning run's trunk cache of the training photos), first refit the tags
    classifier to the best model's tuned encoder, stored with the scores in the same save.

    Uses the best model's encoder grids, cached (the same preprocessing and encoder as captioning a file: for a
    frozen encoder the entries training used, for a fine-tuned one its own), and the Java PTB tokenizer when Java
    is present; the scores are recorded in the best model's config.json.
    """
    best = load_model(best_dir, device)
    if refit_tags_on is not None:
        best.tagger = refit_tag_head(best.encoder, refit_tags_on, config.encoder.weights or None)
    java = shutil.which("java") is not None
    metrics = ("bleu", "meteor", "rouge", "cider") if java else ("bleu", "rouge", "cider")
    splits = {"val": val_set}
    if config.data.test_annotations:
        splits["test"] = first_images(load_coco(config.data.test_annotations, config.data.images),
                                      config.data.max_images)
    scores = {}
    for name, dataset in splits.items():
        cache = build_feature_cache(
            best.encoder, best.preprocess, [r.path for r in dataset.images], config.train.cache_dir,
            config.train.cache_dtype, workers=config.train.workers, device=str(device),
        )
        full = dataclasses.replace(config, eval=dataclasses.replace(config.eval, max_images=0))
        _, predictions = validate(best.decoder, best.vocab, cache, dataset, full, device, metrics=())
        references = {r.image_id: r.captions for r in dataset.images if r.image_id in predictions}
        scores[name] = score_captions(predictions, references, metrics, java_tokenizer=java)
        log.info("best model on %s: %s", name, format_metrics(scores[name]))
    best.metrics |= {"final": scores}
    best.training["total_seconds"] = round(seconds, 1)
    save_model(best, best_dir)
