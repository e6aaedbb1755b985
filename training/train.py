"""The training loop: cross-entropy with teacher forcing, CIDEr-based model selection, resume, DDP.

Plain PyTorch, no framework: read ``train`` from top to bottom. One epoch visits every (image, caption) pair once
in a seeded order; after every ``eval_every`` epochs the model captions the validation images with real decoding
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
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from captioner.atomic import atomic_write_bytes, atomic_write_text
from captioner.checkpoint import CaptionModel, load_model, read_config, save_model
from captioner.decoding import DecodingOptions, decode
from captioner.encoder import build_encoder, get_backbone
from captioner.model import CaptionDecoder, DecoderConfig, masked_cross_entropy
from captioner.preprocess import PreprocessConfig, preprocess
from captioner.vocabulary import Vocabulary
from training.config import Config
from training.data import CaptionDataset, first_images, load_coco
from training.evaluation import compute_metrics, format_metrics, score_captions
from training.features import FeatureCache, build_feature_cache
from training.report import plot_curves
from training.scst import CiderD, scst_loss
from training.scst import check_baseline as check_scst_baseline

log = logging.getLogger(__name__)
TRAINER_STATE = "trainer_state.pt"


# ----------------------------------------------------------------------------------------------------------------
# Data: (image, caption) pairs whose image side is a cached feature grid, or a preprocessed image when fine-tuning.


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
    """Index i -> (image input, tokens): the cached grid of the pair's image, or the preprocessed image.

    With a ``mirror_cache`` (the grids of the horizontally flipped images), :meth:`choose_mirrored` draws, for each
    epoch, which pairs read their image's mirrored grid instead: a seeded coin per pair, so a resumed or distributed
    run makes the same choices.
    """

    def __init__(
        self,
        rows: Tensor,
        tokens: Tensor,
        cache: FeatureCache | None,
        dataset: CaptionDataset,
        preprocess_config: PreprocessConfig,
        mirror_cache: FeatureCache | None = None,
    ) -> None:
        self.rows, self.tokens, self.cache, self.mirror_cache = rows, tokens, cache, mirror_cache
        self.dataset, self.preprocess_config = dataset, preprocess_config
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
        if self.cache is not None:
            cache = self.mirror_cache if self.mirrored[index] else self.cache
            image = torch.from_numpy(np.asarray(cache.features[row], dtype=np.float32))
        else:
            image = preprocess(self.dataset.images[row].path, self.preprocess_config)
        return image, self.tokens[index]


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


def caption_loss(decoder: nn.Module, grid: Tensor, tokens: Tensor, config: Config, pad: int) -> Tensor:
    """Masked cross-entropy of teacher-forced predictions plus the doubly stochastic attention penalty."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    logits, alphas = decoder(grid, inputs)
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
    _, state = decoder.prepare(grid)
    total = 0.0
    for start in range(0, tokens.size(1) - 1, chunk):
        inputs, targets = inputs_all[:, start : start + chunk], targets_all[:, start : start + chunk]
        n = int((targets != pad).sum())
        if n == 0:
            break
        memory, fresh_state = decoder.prepare(grid)  # recompute per chunk: chunk graphs stay independent
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
    cache: FeatureCache,
    dataset: CaptionDataset,
    config: Config,
    device: torch.device,
    metrics: tuple[str, ...] = ("cider", "bleu"),
) -> tuple[dict[str, float], dict[int, str]]:
    """Caption the validation images with real decoding; returns pycocoevalcap scores and the predictions."""
    e = config.eval
    options = DecodingOptions(
        strategy=e.strategy,
        beam_size=e.beam_size,
        max_length=e.max_length,
        length_penalty=e.length_penalty,
        no_repeat_ngram_size=e.no_repeat_ngram_size,
    )
    rows = [r for r in range(len(dataset.images)) if r not in cache.failed]
    if e.max_images:
        rows = rows[: e.max_images]
    was_training = decoder.training
    decoder.eval()
    predictions: dict[int, str] = {}
    for i in range(0, len(rows), e.batch_size):
        batch = rows[i : i + e.batch_size]
        hyps = decode(decoder, cache.grids(batch).to(device), vocab, options)
        for row, hyp in zip(batch, hyps, strict=True):
            predictions[dataset.images[row].image_id] = vocab.decode(hyp[0].tokens)
    decoder.train(was_training)
    if not metrics:
        return {}, predictions
    references = {dataset.images[r].image_id: dataset.images[r].captions for r in rows}
    return compute_metrics(predictions, references, metrics=metrics, java_tokenizer=False), predictions


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint helpers


def _optimizer_step(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, clip: float, world: int, sync: bool,
    ema: AveragedModel | None = None, model: nn.Module | None = None,
) -> None:
    """Clip the gradient norm and step; ``sync`` averages gradients across ranks (when DDP did not already).

    With ``ema``, the moving average then takes in ``model``'s new weights.
    """
    parameters = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if sync and world > 1:
        for p in parameters:
            dist.all_reduce(p.grad)
            p.grad /= world
    torch.nn.utils.clip_grad_norm_(parameters, clip)
    optimizer.step()
    scheduler.step()
    if ema is not None:
        ema.update_parameters(model)


def _save_last(
    out: Path, model: CaptionModel, optimizer: torch.optim.Optimizer, scheduler: object, progress: dict,
    ema: AveragedModel | None,
) -> None:
    save_model(model, out / "last")
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "progress": progress,
    }
    if ema is not None:
        state["ema"] = ema.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(out / "last" / TRAINER_STATE, buffer.getvalue())


# ----------------------------------------------------------------------------------------------------------------
# The loop


@dataclass
class Distributed:
    """Rank and world size; world 1 when not launched by torchrun."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device_type: str) -> Distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        return cls(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))


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


def train(config: Config, out: str | Path, resume: bool = False) -> Path:
    """Train a model as ``config`` says, writing the run directory ``out``; returns the best model's directory."""
    out = Path(out)
    device_type = config.train.device
    if device_type == "auto":
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    dist_info = Distributed.from_env(device_type)
    device = torch.device("cuda", dist_info.local_rank) if device_type == "cuda" else torch.device(device_type)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    if dist_info.world > 1 and config.train.tbptt:
        raise ValueError("train.tbptt is not supported under torchrun (DistributedDataParallel); set it to 0")
    if config.train.mirror_images and config.encoder.fine_tune_blocks > 0:
        raise ValueError("train.mirror_images needs cached features: set encoder.fine_tune_blocks = 0")
    if not 0.0 <= config.train.ema_decay < 1.0:
        raise ValueError(f"train.ema_decay must be in [0, 1), got {config.train.ema_decay}")
    check_scst_baseline(config.scst.baseline, config.scst.samples)  # now, not after the cross-entropy epochs
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
    preprocess_config = PreprocessConfig(
        config.preprocess.size, config.preprocess.resize, config.preprocess.interpolation, backbone.mean, backbone.std
    )
    encoder = build_encoder(
        config.encoder.name,
        weights_path=config.encoder.weights or None,
        fine_tune_blocks=config.encoder.fine_tune_blocks,
    )
    fine_tune = config.encoder.fine_tune_blocks > 0

    def cache_for(dataset: CaptionDataset, mirrored: bool = False) -> FeatureCache:
        return build_feature_cache(
            encoder,
            preprocess_config,
            [r.path for r in dataset.images],
            config.train.cache_dir,
            config.train.cache_dtype,
            workers=config.train.workers,
            device=str(device),
            mirrored=mirrored,
        )

    # Rank 0 fills the cache first; the other ranks then read the finished entry.
    if not dist_info.main:
        dist.barrier()
    val_cache = cache_for(val_set)
    train_cache = None if fine_tune else cache_for(train_set)
    mirror_cache = cache_for(train_set, mirrored=True) if config.train.mirror_images else None
    if dist_info.main and dist_info.world > 1:
        dist.barrier()
    usable = set(range(len(train_set.images))) - (train_cache.failed if train_cache else set())
    rows, tokens = encode_captions(train_set, vocab, config.data.max_caption_length, usable)
    pairs = CaptionPairs(rows, tokens, train_cache, train_set, preprocess_config, mirror_cache)
    log.info("training pairs: %d captions of %d images", len(pairs), len(usable))

    # --- model, optimizer, schedule
    m = config.model
    decoder = CaptionDecoder(
        DecoderConfig(
            len(vocab),
            encoder.channels,
            m.embed_dim,
            m.hidden_dim,
            m.attention_dim,
            m.num_layers,
            m.cell,
            m.conditioning,
            m.dropout,
        )
    ).to(device)
    encoder.to(device)
    model = CaptionModel(
        encoder, decoder, vocab, preprocess_config, name=config.output.name, version=config.output.version
    )
    steps_per_epoch = math.ceil(len(pairs) // dist_info.world / config.train.batch_size)
    warn_if_warmup_too_long(config.train.warmup_steps, steps_per_epoch * config.train.epochs)
    # Polyak averaging: validation and best/ use the moving average of the weights, last/ the trained weights.
    ema = None
    if config.train.ema_decay:
        ema = AveragedModel(decoder, multi_avg_fn=get_ema_multi_avg_fn(config.train.ema_decay), use_buffers=True)
    evaluated = ema.module if ema is not None else decoder

    def make_optimizer(stage: str) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        if stage == "scst":  # a small constant learning rate, decoder only
            optimizer = torch.optim.AdamW(
                decoder.parameters(), lr=config.scst.lr, weight_decay=config.train.weight_decay
            )
            return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        groups = [{"params": list(decoder.parameters()), "lr": config.train.lr}]
        if fine_tune:
            groups.append(
                {"params": [p for p in encoder.parameters() if p.requires_grad], "lr": config.train.encoder_lr}
            )
        optimizer = torch.optim.AdamW(groups, weight_decay=config.train.weight_decay)
        schedule = _lr_lambda(config, steps_per_epoch * config.train.epochs)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    progress = {"epoch": 0, "step": 0, "stage": "xe", "best_cider": -1.0, "bad_evals": 0, "history": [], "seconds": 0.0}
    if resume and (out / "last" / TRAINER_STATE).is_file():
        last = load_model(out / "last")
        decoder.load_state_dict(last.decoder.state_dict())
        if fine_tune:
            encoder.load_state_dict(last.encoder.state_dict())
        state = torch.load(out / "last" / TRAINER_STATE, map_location="cpu", weights_only=True)
        progress = state["progress"]
        optimizer, scheduler = make_optimizer(progress["stage"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if ema is not None:
            if "ema" not in state:
                raise ValueError(f"{out / 'last'} was trained without train.ema_decay; resume with the same config")
            ema.load_state_dict(state["ema"])
        log.info("resuming after epoch %d (step %d)", progress["epoch"], progress["step"])
    else:
        optimizer, scheduler = make_optimizer("xe")
        if dist_info.main:
            out.mkdir(parents=True, exist_ok=True)
    if dist_info.main:
        atomic_write_text(out / "config.toml", config.to_toml())

    net: nn.Module = DistributedDataParallel(decoder) if dist_info.world > 1 else decoder
    writer = None
    if dist_info.main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tensorboard"))
    use_amp = (config.train.amp and device.type == "cuda") or (config.train.amp_on_cpu and device.type == "cpu")
    cider = None
    total_epochs = config.train.epochs + config.scst.epochs

    while progress["epoch"] < total_epochs:
        epoch = progress["epoch"] + 1
        stage = "xe" if epoch <= config.train.epochs else "scst"
        if stage == "scst" and progress["stage"] != "scst":
            # Self-critical training starts from the best cross-entropy weights, with a fresh optimizer.
            if fine_tune or train_cache is None:
                raise ValueError("SCST needs cached features: set encoder.fine_tune_blocks = 0 or scst.epochs = 0")
            if (out / "best").is_dir():
                decoder.load_state_dict(load_model(out / "best").decoder.state_dict())
            if ema is not None:  # the average restarts from the weights SCST starts from
                ema.module.load_state_dict(decoder.state_dict())
            optimizer, scheduler = make_optimizer("scst")
            progress["stage"], progress["bad_evals"] = "scst", 0
        epoch_start = time.time()
        net.train()
        encoder.train(fine_tune)
        losses = []
        if stage == "xe":
            batches = epoch_batches(
                len(pairs), config.train.batch_size, config.train.seed, epoch, dist_info.rank, dist_info.world,
                lengths=(tokens != vocab.pad).sum(dim=1) if config.train.bucket_by_length else None,
            )
            pairs.choose_mirrored(config.train.seed, epoch)
            loader = DataLoader(pairs, batch_sampler=batches, num_workers=config.train.workers if fine_tune else 0)
            bar = tqdm(loader, desc=f"epoch {epoch}/{total_epochs} xe", disable=not dist_info.main, unit="batch")
            for images, batch_tokens in bar:
                images, batch_tokens = images.to(device, non_blocking=True), batch_tokens.to(device)
                batch_tokens = batch_tokens[:, : int((batch_tokens != vocab.pad).sum(1).max())]  # trim padding
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    grid = encoder(images) if fine_tune else images
                    if config.train.tbptt:
                        loss_value = tbptt_backward(decoder, grid, batch_tokens, config, vocab.pad)
                    else:
                        loss = caption_loss(net, grid, batch_tokens, config, vocab.pad)
                        loss.backward()
                        loss_value = float(loss.detach())
                _optimizer_step(
                    optimizer, scheduler, config.train.grad_clip, dist_info.world, sync=False, ema=ema, model=decoder
                )
                progress["step"] += 1
                losses.append(loss_value)
                bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                if writer is not None:
                    writer.add_scalar("train/loss", loss_value, progress["step"])
                    writer.add_scalar("train/lr", scheduler.get_last_lr()[0], progress["step"])
        else:
            if cider is None:
                cider = CiderD({r.image_id: r.captions for r in train_set.images})
            image_rows = sorted(usable)
            batches = epoch_batches(
                len(image_rows), config.scst.batch_size, config.train.seed, epoch, dist_info.rank, dist_info.world
            )
            bar = tqdm(batches, desc=f"epoch {epoch}/{total_epochs} scst", disable=not dist_info.main, unit="batch")
            for batch in bar:
                rows_ = [image_rows[i] for i in batch]
                grid = train_cache.grids(rows_).to(device)
                optimizer.zero_grad(set_to_none=True)
                loss, reward, baseline = scst_loss(
                    decoder,
                    grid,
                    [train_set.images[r].image_id for r in rows_],
                    vocab,
                    cider,
                    config.scst.samples,
                    config.scst.max_length,
                    config.scst.baseline,
                )
                loss.backward()
                _optimizer_step(
                    optimizer, scheduler, config.train.grad_clip, dist_info.world, sync=True, ema=ema, model=decoder
                )
                progress["step"] += 1
                losses.append(float(loss.detach()))
                bar.set_postfix(reward=f"{reward:.3f}", baseline=f"{baseline:.3f}")
                if writer is not None:
                    writer.add_scalar("scst/sample_reward", reward, progress["step"])
                    writer.add_scalar("scst/baseline_reward", baseline, progress["step"])

        entry: dict = {
            "epoch": epoch,
            "stage": stage,
            "train_loss": float(np.mean(losses)),
            "epoch_seconds": time.time() - epoch_start,
        }
        stop = False
        if dist_info.main:
            improved = False
            if epoch % config.train.eval_every == 0 or epoch in (config.train.epochs, total_epochs):
                eval_start = time.time()
                scores, _ = validate(evaluated, vocab, val_cache, val_set, config, device)
                entry["val"] = scores
                if ema is not None:  # the trained weights too, to show what the averaging adds
                    entry["val_trained_weights"], _ = validate(decoder, vocab, val_cache, val_set, config, device)
                entry["eval_seconds"] = time.time() - eval_start
                for key, value in scores.items():
                    writer.add_scalar(f"val/{key}", value, epoch)
                if scores["CIDEr"] > progress["best_cider"]:
                    progress["best_cider"], progress["bad_evals"], improved = scores["CIDEr"], 0, True
                else:
                    progress["bad_evals"] += 1
                stop = progress["bad_evals"] >= config.train.patience
            progress["seconds"] += time.time() - epoch_start
            progress["history"].append(entry)
            model.training = {
                "epochs": epoch,
                "steps": progress["step"],
                "seconds": round(progress["seconds"], 1),
                "device": str(device),
                "world_size": dist_info.world,
                "config": config.to_dict(),
            }
            model.decoding = {
                "strategy": config.eval.strategy,
                "beam_size": config.eval.beam_size,
                "max_length": config.eval.max_length,
                "length_penalty": config.eval.length_penalty,
                "no_repeat_ngram_size": config.eval.no_repeat_ngram_size,
            }
            if improved:
                model.metrics = {"val": scores, "epoch": epoch, "stage": stage}
                save_model(dataclasses.replace(model, decoder=evaluated), out / "best")
            progress["epoch"] = epoch
            _save_last(out, model, optimizer, scheduler, progress, ema)
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")
            plot_curves(progress["history"], out / "curves.png")
            val_text = " ".join(f"{k}={v * 100:.1f}" for k, v in entry.get("val", {}).items())
            log.info(
                "epoch %d (%s): loss %.3f, %.0fs %s",
                epoch,
                stage,
                entry["train_loss"],
                entry["epoch_seconds"],
                val_text,
            )
        else:
            progress["epoch"] = epoch
            progress["history"].append(entry)
        if dist_info.world > 1:
            flag = [stop]
            dist.broadcast_object_list(flag, src=0)
            stop = flag[0]
        if stop:
            log.info("early stopping (%s): no CIDEr improvement in %d evaluations", stage, config.train.patience)
            if stage == "scst" or config.scst.epochs == 0:
                break
            progress["epoch"] = config.train.epochs  # go on with the SCST stage

    if writer is not None:
        writer.close()
    if dist_info.main and (out / "best").is_dir():
        final_evaluation(out / "best", config, val_set, val_cache, device, time.time() - started)
    if dist_info.world > 1:
        dist.barrier()
    log.info("training finished in %.0fs", time.time() - started)
    return out / "best"


def final_evaluation(
    best_dir: Path, config: Config, val_set: CaptionDataset, val_cache: FeatureCache, device: torch.device,
    seconds: float,
) -> None:
    """Score the best model on the validation split (and the test split, if configured) with every metric.

    Uses the cached encoder grids (the same preprocessing and encoder as captioning a file) and the Java PTB
    tokenizer when Java is present; the scores are recorded in the best model's config.json.
    """
    best = load_model(best_dir, device)
    java = shutil.which("java") is not None
    metrics = ("bleu", "meteor", "rouge", "cider") if java else ("bleu", "rouge", "cider")
    splits = {"val": (val_set, val_cache)}
    if config.data.test_annotations:
        test_set = first_images(load_coco(config.data.test_annotations, config.data.images), config.data.max_images)
        test_cache = build_feature_cache(
            best.encoder, best.preprocess, [r.path for r in test_set.images], config.train.cache_dir,
            config.train.cache_dtype, workers=config.train.workers, device=str(device),
        )
        splits["test"] = (test_set, test_cache)
    scores = {}
    for name, (dataset, cache) in splits.items():
        full = dataclasses.replace(config, eval=dataclasses.replace(config.eval, max_images=0))
        _, predictions = validate(best.decoder, best.vocab, cache, dataset, full, device, metrics=())
        references = {r.image_id: r.captions for r in dataset.images if r.image_id in predictions}
        scores[name] = score_captions(predictions, references, metrics, java_tokenizer=java)
        log.info("best model on %s: %s", name, format_metrics(scores[name]))
    best.metrics |= {"final": scores}
    best.training["total_seconds"] = round(seconds, 1)
    save_model(best, best_dir)
