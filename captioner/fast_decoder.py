"""An inference-only fast path for :class:`captioner.model.CaptionDecoder`: the same step, fewer and larger ops.

``model.py`` reads like the papers (embed, attend, gate, cell, classify); decoding calls that step a few hundred
thousand times per evaluation, so :class:`FastDecoder` computes the same function with algebra moved out of the
loop. It is built from a decoder in eval mode and only ever used under ``torch.inference_mode`` by
:func:`captioner.decoding.decode`; training never sees it and the state_dict is untouched.

What changes per step (all exact f32 algebra; only the order of float operations differs, ~1e-6):

* **Per-word tables.** The first cell's input is ``[embed(w) ; gated context]``, so its input gates are
  ``W_e embed(w) + W_c context + b``. ``W_e embed(w) + b`` depends only on the word: one (vocab, gates) table,
  computed once, and a step gathers rows instead of a matmul over the embedding columns.
* **One matmul on the previous hidden state.** The attention query, the beta gate and (one layer) the cell's
  recurrent gates all read the same ``h``: their weights are concatenated into one matrix.
* **Finished beams skip the cell and the classifier.** Beam search never reads a finished beam's logits (it
  continues with ``<pad>`` at no cost), so ``step(..., active=~finished)`` computes only the live rows.
* **Attention with a sigmoid for its tanh, in cache-sized chunks of images.** ``tanh(keys + query)`` over
  (images, beams, N, A) is the largest tensor of a step, and PyTorch's CPU tanh is several times slower than its
  sigmoid. ``tanh(x) = 2 sigmoid(2x) - 1``, so the scores are ``(2w) . sigmoid(2 keys + 2 query) - sum(w) + b``:
  the keys and the query weights are doubled once (exact in floating point) and the constant ``b - sum(w)``,
  the same for every grid cell, is dropped because softmax ignores it. Computing it a few images at a time keeps
  the tensor in the CPU's cache.
* **The matrix products in ONNX Runtime** (:class:`Gemm`, on CPU where it is installed). Three products (on h,
  on the gated context, the classifier) are most of a step, and the sgemm PyTorch calls (MKL's) ran them 1.5-3x
  slower than ONNX Runtime's MLAS kernels on the AMD AVX2 development machine; each weight becomes a one-node
  session that packs it once. The attention keys of ``memory_and_state`` go the same way.
* **Optionally, bfloat16 products** (``precision="bfloat16"``, torch): the four products' weights rounded to
  bfloat16 once and prepacked for oneDNN, each call's input rounded to bfloat16, the product's sum kept in float32
  by the kernel, then rounded to bfloat16 and added to the float32 bias. On CPUs with AMX or AVX-512 BF16 the
  products run ~2-3x faster at a batch's row counts; not exact: with v5, 7% of the test captions change and CIDEr
  drops by 0.6-0.9 (README, "Decoder precision").
* **Optionally, int8 products** (``precision="int8"``, ONNX Runtime on CPU only): the same four products with the
  weights quantized once, per output column, and each call's input quantized on the fly. Not exact: on the
  Flickr8k test split 4.5-6.3% of the bundled models' captions change (v3 to v5) and CIDEr moves by -0.2 to +0.1
  (README, "Decoder precision"); the products run ~2x faster.
The default, ``"float32"``, writes the reference's captions.

The tables are rebuilt whenever a parameter changes (keyed by each parameter's storage and version counter), so
training's validation decodes with the current weights.
"""

from __future__ import annotations

import functools
import importlib.util
import weakref

import torch
from torch import Tensor

from captioner.model import CaptionDecoder, Memory, State

# Images per attention chunk: (chunk * beams * N * A) floats, about 1 MiB for the bundled model at beam 5.
ATTENTION_CHUNK_BYTES = 1 << 20
# Who multiplies the step's matrices (see :class:`Gemm`): "auto" is ONNX Runtime on CPU where it is installed,
# except on Intel CPUs, where torch's MKL runs these small products as fast or faster (see resolve_gemm_backend).
GEMM_BACKENDS = ("auto", "torch", "onnxruntime")
# How precisely the step's products are computed: "float32" (the reference's captions), "bfloat16" (faster on CPUs
# with AMX / AVX-512 BF16 and on GPUs; a few captions change) or "int8" (faster; ONNX Runtime on the CPU only).
DECODER_PRECISIONS = ("float32", "bfloat16", "int8")
DECODER_PRECISION_HELP = (
    "the decoder's products: float32 (the reference's captions), bfloat16 (faster on CPUs with AMX or AVX-512 "
    "BF16, and GPUs; a few captions change) or int8 (faster on CPU with onnxruntime; a few captions change)"
)


@functools.cache  # the machine does not change, and every Gemm of every decoder asks
def _cpuinfo(field: str) -> str:
    """The first CPU's ``field`` in /proc/cpuinfo (Linux); "" where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.split(":")[0].strip() == field:
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return ""


def cpu_vendor() -> str:
    """The CPU's vendor as Linux reports it ("GenuineIntel", "AuthenticAMD", ...); "" where it cannot be read."""
    return _cpuinfo("vendor_id")


def resolve_gemm_backend(
    backend: str, device: torch.device, dtype: torch.dtype = torch.float32, precision: str = "float32"
) -> str:
    """``"torch"`` or ``"onnxruntime"`` for ``backend`` and weights on ``device`` of ``dtype``: "auto" takes ONNX
    Runtime for float32 weights on the CPU where it (and ``onnx``, which builds its graphs) is installed, torch
    otherwise (GPUs, other precisions). ``precision="int8"`` needs ONNX Runtime; a ValueError says why not.

    On Intel CPUs "auto" keeps float32 products in torch: MKL runs them well there (on a 2-core Xeon with AVX-512,
    a lone image decoded 1.66x faster than with ONNX Runtime, batch 32 level), while on AMD's it ran them at a
    fraction of ONNX Runtime's speed. The choice depends on the machine only, never on timing, so every process
    on a machine writes the same captions."""
    if backend not in GEMM_BACKENDS:
        raise ValueError(f"unknown matrix-product backend {backend!r} (expected one of {GEMM_BACKENDS})")
    if precision not in DECODER_PRECISIONS:
        raise ValueError(f"unknown decoder precision {precision!r} (expected one of {', '.join(DECODER_PRECISIONS)})")
    supported = torch.device(device).type == "cpu" and dtype == torch.float32
    installed = all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))
    if precision == "int8":
        problem = (
            "onnxruntime and onnx are not installed" if not installed
            else f"the weights are {dtype} on {device}" if not supported
            else "the torch backend was asked for" if backend == "torch"
            else None
        )  # fmt: skip
        if problem:
            raise ValueError(f"int8 decoding runs the decoder's products in ONNX Runtime on the CPU: {problem}")
    if precision == "bfloat16":
        problem = (
            "the onnxruntime backend was asked for" if backend == "onnxruntime"
            else None if torch.device(device).type != "cpu" or cpu_has_fast_bfloat16()
            else "this CPU (or this torch build) has no bfloat16 matrix kernels (AMX or AVX-512 BF16)"
        )  # fmt: skip
        if problem:
            raise ValueError(f"bfloat16 decoding runs the decoder's products in torch: {problem}")
        return "torch"
    if backend == "onnxruntime" and not supported:
        raise ValueError(f"the onnxruntime matrix products take float32 weights on the CPU, not {dtype} on {device}")
    if backend == "auto":
        fast_in_onnxruntime = precision == "int8" or cpu_vendor() != "GenuineIntel"
        return "onnxruntime" if supported and installed and fast_in_onnxruntime else "torch"
    return backend


def cpu_has_fast_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AMX or AVX-512 BF16; oneDNN would emulate it on other AVX-512
    CPUs, slower than float32) and torch's oneDNN exposes the prepacked linear kernel :class:`Gemm` calls."""
    mkldnn, ops = torch.ops.mkldnn, ("_is_mkldnn_bf16_supported", "_reorder_linear_weight", "_linear_pointwise")
    flags = _cpuinfo("flags").split()
    return (
        ("amx_bf16" in flags or "avx512_bf16" in flags)
        and torch.backends.mkldnn.is_available()
        and all(hasattr(mkldnn, op) for op in ops)
        and bool(mkldnn._is_mkldnn_bf16_supported())
    )


class Gemm:
    """``x @ weight + addend`` for one fixed weight (K, N): ``torch.addmm``, or ONNX Runtime's kernels on CPU.

    The addend is the fixed ``bias`` (N,), or, where ``bias`` is None, a (rows, N) tensor given with each call.
    Why ONNX Runtime: a decoding step multiplies a few to a few hundred rows by 2-10 MB weights, and the CPU
    matmul PyTorch calls (MKL's sgemm) is slow at those shapes on some CPUs: on the AMD EPYC (AVX2) of the
    development machine it ran at 3-5 GFLOP/s for 5 rows (one image's beams) and ~20 for 160 rows, where ONNX
    Runtime's MLAS kernels (which pre-pack the constant weight once, at session creation) ran ~3x and ~1.5x faster.
    Both compute the exact f32 product; only the summation order differs. With ``precision="int8"`` (ONNX Runtime
    only) the product is int8 (see :func:`_onnxruntime_gemm`). With ``precision="bfloat16"`` (torch only) the
    weight is rounded to bfloat16 once, on the CPU prepacked for oneDNN's kernels (the private op inductor's
    frozen graphs call: packing once is what makes small row counts fast), and the product is rounded to bfloat16
    before the float32 addend is added.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, backend: str, precision: str = "float32") -> None:
        self.weight, self.bias = weight, bias
        self.session = _onnxruntime_gemm(weight, bias, precision) if backend == "onnxruntime" else None
        # bfloat16: on the CPU only the prepacked copy is kept, on a GPU the plain one (its kernels need no packing).
        self.packed = self.bf16 = None
        if precision == "bfloat16":
            bf16 = weight.to(torch.bfloat16)
            if weight.device.type == "cpu":
                self.packed = torch.ops.mkldnn._reorder_linear_weight(bf16.t().contiguous())  # (N, K) for oneDNN
            else:
                self.bf16 = bf16

    def __call__(self, x: Tensor, addend: Tensor | None = None) -> Tensor:
        """``x`` (rows, K) times the weight, plus the bias or ``addend`` (rows, N)."""
        addend = self.bias if addend is None else addend
        if x.size(0) == 0:
            return torch.addmm(addend, x, self.weight)
        if self.packed is not None:
            product = torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), self.packed, None, "none", [], "")
            return product.float().add_(addend)
        if self.bf16 is not None:
            return torch.mm(x.to(torch.bfloat16), self.bf16).float().add_(addend)
        if self.session is None:
            return torch.addmm(addend, x, self.weight)
        # The fast path only runs inference: a caller outside inference mode (a script calling the search directly)
        # hands tensors that record gradients, which ONNX Runtime cannot follow anyway.
        feeds = {"x": x.detach().contiguous().numpy()}
        if self.bias is None:
            feeds["addend"] = addend.detach().contiguous().numpy()
        return torch.from_numpy(self.session.run(None, feeds)[0])


def _onnxruntime_gemm(weight: Tensor, bias: Tensor | None, precision: str = "float32") -> object:
    """An ONNX Runtime session of y = x @ weight + (bias, or the input ``addend``): one ``Gemm`` node in float32.

    In int8, ``DynamicQuantizeMatMul`` (ONNX Runtime's own op) then ``Add``: the weight is quantized here, once,
    symmetrically per output column to 7 bits (|q| <= 63), and each call's ``x`` to uint8 by the op. Why 7 bits:
    without AVX-VNNI, the x86 kernel sums pairs of uint8 x int8 products in int16, and 2 * 255 * 63 fits where
    2 * 255 * 127 may saturate (ONNX Runtime's quantizer calls this ``reduce_range``).
    """
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    k, n = weight.shape
    weight = weight.detach().cpu().float().contiguous()
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", k])]
    initializers = []
    if bias is None:
        inputs.append(helper.make_tensor_value_info("addend", TensorProto.FLOAT, ["rows", n]))
        addend = "addend"
    else:
        initializers.append(numpy_helper.from_array(bias.detach().cpu().float().contiguous().numpy(), "bias"))
        addend = "bias"
    opsets = [helper.make_opsetid("", 17)]
    if precision == "int8":
        peak = weight.abs().amax(dim=0)
        scale = torch.where(peak > 0, peak / 63, torch.ones_like(peak))  # an all-zero column stays zero
        initializers += [
            numpy_helper.from_array(torch.round(weight / scale).to(torch.int8).numpy(), "weight"),
            numpy_helper.from_array(scale.numpy(), "scale"),
            numpy_helper.from_array(torch.zeros(n, dtype=torch.int8).numpy(), "zero_point"),
        ]
        nodes = [
            helper.make_node("DynamicQuantizeMatMul", ["x", "weight", "scale", "zero_point"], ["product"],
                             domain="com.microsoft"),
            helper.make_node("Add", ["product", addend], ["y"]),
        ]  # fmt: skip
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    else:
        initializers.append(numpy_helper.from_array(weight.numpy(), "weight"))
        nodes = [helper.make_node("Gemm", ["x", "weight", addend], ["y"])]
    graph = helper.make_graph(
        nodes, "gemm", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", n])], initializers
    )
    model = helper.make_model(graph, opset_imports=opsets)
    return onnxruntime.InferenceSession(
        model.SerializeToString(), _session_options(), providers=["CPUExecutionProvider"]
    )


def _session_options() -> object:
    """One thread per product, no spinning between calls: :func:`captioner.decoding.decode` runs one part of a
    batch per core, each in its own thread (and a product of one image's beams is too small to split)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class FastDecoder:
    """``memory_and_state`` and ``step`` of a :class:`CaptionDecoder` in eval mode, computed with precomputed tables."""

    def __init__(self, decoder: CaptionDecoder, gemm: str = "auto", precision: str = "float32") -> None:
        if decoder.training:
            raise ValueError("FastDecoder is for inference: put the decoder in eval mode")
        # A weak reference: the cache below maps each decoder to its FastDecoder, and a strong one would keep
        # every decoder ever decoded with alive.
        self._decoder = weakref.ref(decoder)
        self.config = c = decoder.config
        self.cell = c.cell
        self.layers = c.num_layers
        weight = decoder.classifier.weight
        self.gemm = backend = resolve_gemm_backend(gemm, weight.device, weight.dtype, precision)
        self.precision = precision

        def product(weight: Tensor, bias: Tensor | None) -> Gemm:
            return Gemm(weight, bias, backend, precision)

        cells = decoder.cells
        with torch.no_grad():
            first = cells[0]
            w_ih = first.weight_ih.detach()
            e = c.embed_dim
            b_ih = first.bias_ih.detach()
            b_hh = first.bias_hh.detach()
            # The recurrent bias joins the input side except for the GRU's candidate gate, where r scales it.
            joint_bias = b_ih + b_hh if self.cell != "gru" else b_ih
            self.word_gates = torch.addmm(joint_bias, decoder.embed.weight.detach(), w_ih[:, :e].t())  # (V, gates)
            # The context's share of the gates, added to the word's rows: the product's addend is given per call.
            self.context_gemm = (
                product(w_ih[:, e:].t().contiguous(), None) if decoder.attention is not None else None
            )
            self.hh_bias = [b_hh if self.cell == "gru" else None] + [
                cell.bias_hh.detach() if self.cell == "gru" else None for cell in cells[1:]
            ]
            self.upper = [
                (product(cell.weight_ih.detach().t().contiguous(),
                         cell.bias_ih.detach() + (0 if self.cell == "gru" else cell.bias_hh.detach())),
                 product(cell.weight_hh.detach().t().contiguous(), torch.zeros_like(cell.bias_hh)))
                for cell in cells[1:]
            ]
            gates = w_ih.size(0)
            # One matmul on the top layer's previous h: [attention query | beta gate | layer-0 recurrent gates
            # (one layer only: with more, layer 0 reads its own h)].
            parts_w, parts_b, self.splits = [], [], []
            if decoder.attention is not None:
                query, gate = decoder.attention.query, decoder.gate
                # The query doubled, for sigmoid(2x) (see the module's docstring).
                parts_w += [2 * query.weight.detach(), gate.weight.detach()]
                parts_b += [2 * query.bias.detach(), gate.bias.detach()]
                self.splits += [query.out_features, gate.out_features]
            self.fused_hh = self.layers == 1
            if self.fused_hh:
                parts_w.append(first.weight_hh.detach())
                parts_b.append(torch.zeros(gates, dtype=w_ih.dtype, device=w_ih.device))
                self.splits.append(gates)
            self.h_gemm = product(torch.cat(parts_w).t().contiguous(), torch.cat(parts_b)) if parts_w else None
            self.hh0_gemm = None if self.fused_hh else product(
                first.weight_hh.detach().t().contiguous(), torch.zeros_like(first.bias_hh)
            )
            if decoder.attention is not None:
                key = decoder.attention.key  # doubled, for sigmoid(2x); x2 is exact, so the keys are exactly 2x
                self.key_gemm = product(2 * key.weight.detach().t().contiguous(), 2 * key.bias.detach())
                self.score_weight = 2 * decoder.attention.score.weight.detach().view(-1)  # (A,), doubled
            self.classifier_gemm = product(
                decoder.classifier.weight.detach().t().contiguous(), decoder.classifier.bias.detach()
            )

    def memory_and_state(self, grid: Tensor) -> tuple[Memory, State]:
        """The decoder's own ``memory_and_state``, with the attention keys doubled (for sigmoid(2x)).

        The keys, one row per grid cell and the largest product outside the steps, go through :class:`Gemm`; the
        rest is ``CaptionDecoder.memory_and_state`` line for line.
        """
        decoder = self._decoder()
        if decoder.attention is None:
            return decoder.memory_and_state(grid)
        features = grid.flatten(2).transpose(1, 2)  # (batch, N, C)
        pooled = features.mean(dim=1)
        batch, layers, hidden = features.size(0), self.config.num_layers, self.config.hidden_dim
        h = torch.tanh(decoder.init_h(pooled)).view(batch, layers, hidden)
        state: State = (h, torch.tanh(decoder.init_c(pooled)).view(batch, layers, hidden)) if decoder.is_lstm else (h,)
        keys = self.key_gemm(features.reshape(-1, features.size(2))).view(batch, features.size(1), -1)
        return (features, keys), state

    def _attend(self, features: Tensor, keys: Tensor, query: Tensor) -> Tensor:
        """Context (B * G, C) for doubled queries (B * G, A) over ``features`` (B, N, C) and doubled ``keys``."""
        images, n, a = keys.shape
        query = query.view(images, -1, 1, a)
        per_image = query.size(1) * n * a * keys.element_size()
        chunk = max(1, ATTENTION_CHUNK_BYTES // per_image)
        scores = []
        for start in range(0, images, chunk):
            energy = keys[start : start + chunk].unsqueeze(1) + query[start : start + chunk]  # (b, G, N, A)
            scores.append(torch.matmul(energy.sigmoid_(), self.score_weight))  # (b, G, N)
        alpha = (torch.cat(scores) if len(scores) > 1 else scores[0]).softmax(dim=2)
        return torch.bmm(alpha, features).flatten(0, 1)

    def _cell(self, gates: Tensor, hh: Tensor | None, h: Tensor, c: Tensor | None, layer: int) -> tuple[Tensor, ...]:
        """One cell update from its input gates (input side incl. biases) and recurrent gates ``hh`` (no bias)."""
        if self.cell == "lstm":
            gates = gates + hh
            i, f, g, o = gates.chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return torch.sigmoid(o) * torch.tanh(c), c
        if self.cell == "gru":
            hh = hh + self.hh_bias[layer]
            i_r, i_z, i_n = gates.chunk(3, dim=1)
            h_r, h_z, h_n = hh.chunk(3, dim=1)
            r = torch.sigmoid(i_r + h_r)
            z = torch.sigmoid(i_z + h_z)
            n = torch.tanh(i_n + r * h_n)
            return ((1 - z) * n + z * h,)
        return (torch.tanh(gates + hh),)

    def step(
        self, tokens: Tensor, state: State, memory: Memory, active: Tensor | None = None
    ) -> tuple[Tensor, State, None]:
        """``CaptionDecoder.step`` in eval mode: logits (batch, vocab) and the new state (no attention weights).

        ``active`` (batch,) bool, optional, marks the rows whose results will be read: the others (beam search's
        finished beams) still attend, since their image's beams attend together, but skip the cell and the
        classifier; their logits come back as zeros and their state unchanged.
        """
        fused: tuple[Tensor, ...] = ()
        if self.h_gemm is not None:  # [query | beta | layer-0 recurrent gates] from the top layer's h
            fused = self.h_gemm(state[0][:, -1]).split(self.splits, dim=1)
        context = None
        if self.config.conditioning == "attention":
            context = self._attend(memory[0], memory[1], fused[0])
        if active is None or bool(active.all()):
            logits, new_state = self._advance(tokens, state, fused, context)
            return logits, new_state, None
        rows = active.nonzero().squeeze(1)
        logits, new_rows = self._advance(
            tokens[rows], tuple(s[rows] for s in state), tuple(f[rows] for f in fused),
            None if context is None else context[rows],
        )  # fmt: skip
        all_logits = logits.new_zeros(tokens.size(0), logits.size(1)).index_copy_(0, rows, logits)
        return all_logits, tuple(s.index_copy(0, rows, n) for s, n in zip(state, new_rows, strict=True)), None

    def _advance(
        self, tokens: Tensor, state: State, fused: tuple[Tensor, ...], context: Tensor | None
    ) -> tuple[Tensor, State]:
        """The cells and the classifier, given the fused products on h and the attention's context."""
        h_prev = state[0]
        gates = self.word_gates[tokens]  # (batch, gates): the word's share of the first cell's input gates
        if context is not None:
            gates = self.context_gemm(torch.sigmoid(fused[1]).mul_(context), gates)
        hh0 = fused[-1] if self.fused_hh else self.hh0_gemm(h_prev[:, 0])
        new_h, new_c = [], []
        out = self._cell(gates, hh0, h_prev[:, 0], state[1][:, 0] if self.cell == "lstm" else None, 0)
        for layer in range(self.layers):
            if layer > 0:
                ih_gemm, hh_gemm = self.upper[layer - 1]
                h = h_prev[:, layer]
                out = self._cell(ih_gemm(new_h[-1]), hh_gemm(h), h,
                                 state[1][:, layer] if self.cell == "lstm" else None, layer)
            new_h.append(out[0])
            if self.cell == "lstm":
                new_c.append(out[1])
        h_stack = torch.stack(new_h, dim=1)
        new_state: State = (h_stack, torch.stack(new_c, dim=1)) if self.cell == "lstm" else (h_stack,)
        return self.classifier_gemm(new_h[-1]), new_state


# Per decoder, per (gemm, precision): the weights' key and the FastDecoder built for them.
_CACHE: weakref.WeakKeyDictionary[CaptionDecoder, dict[tuple[str, str], tuple[tuple, FastDecoder]]] = (
    weakref.WeakKeyDictionary()
)


def fast_decoder(
    decoder: CaptionDecoder, gemm: str = "auto", precision: str = "float32"
) -> FastDecoder | CaptionDecoder:
    """The :class:`FastDecoder` of ``decoder`` (built once per set of weights), or ``decoder`` itself in train mode.

    ``gemm`` picks who multiplies the matrices (:data:`GEMM_BACKENDS`, see :class:`Gemm`), ``precision`` how
    (:data:`DECODER_PRECISIONS`).

    The cache key is every parameter's storage, version counter, dtype and device, so an optimizer step, a
    ``load_state_dict`` or a ``.to()`` rebuilds the tables instead of serving stale ones. Weights that are
    inference tensors (made under ``torch.inference_mode``) have no version counter: their tables are not cached.
    """
    if decoder.training:
        return decoder
    if any(p.is_inference() for p in decoder.parameters()):
        # Weights created under inference_mode have no version counter to key a cache on: build afresh.
        return FastDecoder(decoder, gemm, precision)
    key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in decoder.parameters())
    built = _CACHE.setdefault(decoder, {})
    cached = built.get((gemm, precision))
    if cached is not None and cached[0] == key:
        return cached[1]
    fast = FastDecoder(decoder, gemm, precision)
    built[gemm, precision] = (key, fast)
    return fast
