"""Layer-by-layer activation statistics.

The inputs of decoder layer 0, and what the model passes each layer beside them (masks, position embeddings), are
captured once; then each layer in turn is moved to the device, run over the calibration samples with hooks on its
input sites (:mod:`svdexp.models.decoder`), and its outputs become the next layer's inputs.
Peak memory is one decoder layer plus the activations, whatever the model's depth.

Statistics per input site: ``H`` (Gram matrix ``X X^T``), ``abs_mean`` (mean ``|x|`` per channel),
``H_stack`` (Gram matrix of sample-averaged groups, AdaSVD's stack-of-batch), ``H_tall`` (``H`` at only the sites
with a tall or square matrix, ``m >= n``). Per targeted matrix, at its output: ``C_out`` (Gram matrix
``Y Y^T = W H W^T`` of its outputs ``y = W x``, bias excluded), collected for the matrices with fewer outputs than
inputs (``m < n``), where it is the smaller Gram. Per decoder layer: ``cosine`` (mean cosine similarity of the
layer's input and output hidden states). Per matrix: ``fisher`` (summed squared gradients of the LM loss, reduced
over rows or columns), from a separate backward pass.

Where a statistic is collected follows from its name and the matrices' shapes, so a method's ``needs`` stay a set
of names: svd_llm's auto solver asks for ``{C_out, H_tall}``, i.e. ``C_out`` of every wide matrix and ``H`` only
at sites that still need it (none at ``down_proj``'s: the ``n x n`` Gram of its wide input is never formed).
A matrix's output statistics live in :attr:`LayerStats.sites` under the matrix's path (e.g. ``mlp.down_proj``),
beside the input sites, so every structure keyed by statistic name and site carries them unchanged.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from svdexp.cache.scratch import scratch_file
from svdexp.errors import NumericalError
from svdexp.methods.linalg import damped_cholesky, psd_root
from svdexp.models.decoder import Decoder, as_matrix_grad, matrix_shape

if TYPE_CHECKING:
    from svdexp.context import RunContext

SITE_STATS = frozenset({"H", "H_tall", "abs_mean", "H_stack"})   # per input site; "C_out": per wide matrix


def site_needs(needs: frozenset[str], shapes: list[tuple[int, int]]) -> frozenset[str]:
    """The statistics of ``needs`` collected at an input site whose matrices have ``shapes`` (``(m, n)``)."""
    wanted = needs & SITE_STATS
    return wanted if any(m >= n for m, n in shapes) else wanted - {"H_tall"}


def wants_output_gram(needs: frozenset[str], shape: tuple[int, int]) -> bool:
    """Whether ``C_out`` of a matrix of ``shape`` is collected: asked for, and the output is the narrow side."""
    return "C_out" in needs and shape[0] < shape[1]


class SiteStats:
    """The statistics of one input site, shared by the matrices reading it (or of one matrix's output); caches
    its Cholesky factor and square root."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self.damping = 0.0
        self._chol: dict[tuple[str, float], torch.Tensor] = {}
        self._root: dict[str, torch.Tensor] = {}

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def cholesky(self, key: str = "H", eps: float = 1e-6) -> torch.Tensor:
        """Lower ``S`` with ``S S^T = tensors[key]`` (damped if needed; the damping is recorded)."""
        if (key, eps) not in self._chol:
            chol = damped_cholesky(self.tensors[key], eps=eps)
            self.damping = max(self.damping, chol.damping)
            self._chol[(key, eps)] = chol.S
        return self._chol[(key, eps)]

    def root(self, key: str = "H") -> torch.Tensor:
        """``S`` with ``S S^T = tensors[key]``, never inverted (:func:`~svdexp.methods.linalg.psd_root`: no
        damping, ``H`` may be singular)."""
        if key not in self._root:
            self._root[key] = psd_root(self.tensors[key])
        return self._root[key]


@dataclass
class MatrixStats:
    """What a method sees for one matrix: its site's statistics plus its own (e.g. ``fisher``)."""
    site: SiteStats
    own: dict[str, torch.Tensor] = field(default_factory=dict)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.own[key] if key in self.own else self.site[key]

    def __contains__(self, key: str) -> bool:
        return key in self.own or key in self.site

    def cholesky(self, key: str = "H", eps: float = 1e-6) -> torch.Tensor:
        return self.site.cholesky(key, eps)

    def root(self, key: str = "H") -> torch.Tensor:
        return self.site.root(key)


class DiskActivations:
    """Calibration activations in a memory-mapped file (``calib.activations=disk``): two slots, a layer's inputs
    and its outputs, each ``samples x seq_len x hidden`` in the model's dtype, written and read a batch at a time;
    the kernel pages them out instead of the process holding them. Same values as in memory, bit for bit."""

    def __init__(self, path: Path, num_samples: int, batch_size: int) -> None:
        self.path, self.num_samples, self.batch_size = path, num_samples, batch_size
        self.data: torch.Tensor | None = None

    def put(self, slot: int, batch: int, hidden: torch.Tensor) -> torch.Tensor:
        """Store ``hidden`` (batch ``batch`` of a layer's inputs or outputs) in ``slot``; returns the stored view."""
        if self.data is None:
            shape = (2, self.num_samples, *hidden.shape[1:])
            numel = math.prod(shape)
            with open(self.path, "wb") as handle:
                handle.truncate(numel * hidden.element_size())        # sparse: blocks are written as filled
            self.data = torch.from_file(str(self.path), shared=True, size=numel, dtype=hidden.dtype).view(shape)
        start = batch * self.batch_size
        view = self.data[slot, start:start + hidden.shape[0]]
        view.copy_(hidden)
        return view


@dataclass
class LayerInputs:
    """Hidden states entering decoder layer ``index``, per calibration batch, and what the model passes each layer
    beside them (``calls[layer][batch]``: extra positional and keyword arguments: masks, position embeddings).
    Layers of one model may be passed different masks (sliding-window and full attention, hybrid layers).
    With ``disk``, the hidden states are views of a memory-mapped file (slot ``index % 2``)."""
    hidden: list[torch.Tensor]
    calls: list[list[tuple[tuple, dict]]]
    index: int = 0
    disk: DiskActivations | None = None

    def keep(self, batch: int, hidden: torch.Tensor, index: int) -> torch.Tensor:
        """``hidden`` as kept for layer ``index``'s batch ``batch``: itself in memory, or written to disk."""
        return hidden if self.disk is None else self.disk.put(index % 2, batch, hidden)


@dataclass(frozen=True)
class StackGroups:
    """AdaSVD's stack-of-batch: the group of every calibration sample."""
    ids: torch.Tensor     # sample index -> group id
    count: int            # the number of groups


def stack_groups(num_samples: int, num_groups: int, seed: int) -> StackGroups:
    """A seeded shuffle of the samples split into ``num_groups`` groups."""
    perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    groups = torch.empty(num_samples, dtype=torch.long)
    groups[perm] = torch.arange(num_samples) % num_groups
    return StackGroups(groups, num_groups)


def groups_for(ctx: RunContext, needs: frozenset[str]) -> StackGroups | None:
    """The stack-of-batch groups of ``ctx``'s calibration samples when ``needs`` holds ``H_stack``."""
    return stack_groups(ctx.calib_ids.shape[0], ctx.num_groups, ctx.seed) if "H_stack" in needs else None


class _Stop(Exception):
    pass


class _StandIn(nn.Module):
    """Takes decoder layer ``index``'s place while the inputs are captured: records what the model passes it and
    hands the hidden state on unchanged, shaped as the real layer returns it; the last one stops the pass.
    Attributes the model reads from its layers (``attention_type``, ...) come from the real layer."""

    def __init__(self, real: nn.Module, index: int, captured: LayerInputs, last: bool, device: torch.device,
                 output: dict[str, bool]):
        super().__init__()
        object.__setattr__(self, "_real", real)      # not a submodule: moving the model leaves the layer where it is
        self.index, self.captured, self.last, self.device = index, captured, last, device
        self.output = output                          # shared by the stand-ins: {"tuple": whether layers return one}

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_real"), name)

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        rest = tuple(args[1:])
        if self.index == 0:
            self.captured.hidden.append(self.captured.keep(len(self.captured.hidden), hidden, 0))
        self.captured.calls[self.index].append((rest, kwargs))
        if self.last:
            raise _Stop
        if "tuple" not in self.output:      # once: how the real layer shapes its output (a tensor or a tuple)
            real = object.__getattribute__(self, "_real").to(self.device)
            self.output["tuple"] = isinstance(real(hidden, *rest, **dict(kwargs)), tuple)
            real.to("cpu")
        return (hidden,) if self.output["tuple"] else hidden


def capture_inputs(model: nn.Module, decoder: Decoder, input_ids: torch.Tensor, batch_size: int,
                   device: torch.device, disk: DiskActivations | None = None) -> LayerInputs:
    """Run the model with every decoder layer replaced by a :class:`_StandIn` and keep what enters layer 0 and
    what each layer is passed besides; no decoder layer's weights visit the device here."""
    layers = decoder.layers(model)
    parent_path, _, attr = decoder.layers_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    captured = LayerInputs([], [[] for _ in layers], 0, disk)
    output: dict[str, bool] = {}
    stand_ins = [_StandIn(layer, i, captured, i == len(layers) - 1, device, output) for i, layer in enumerate(layers)]
    setattr(parent, attr, nn.ModuleList(stand_ins))
    try:
        model.to(device)
        with torch.no_grad():
            for start in range(0, input_ids.shape[0], batch_size):
                try:
                    model(input_ids[start:start + batch_size].to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        setattr(parent, attr, layers)
        model.to("cpu")
    return captured


def _hidden_out(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class _SiteAccumulator:
    """Accumulates one input site's statistics from the inputs its first linear receives (``H`` once, returned
    under each of ``H`` and ``H_tall`` that is needed)."""

    def __init__(self, needs: frozenset[str], groups: StackGroups | None) -> None:
        self.needs = needs
        self.H: torch.Tensor | None = None
        self.abs_sum: torch.Tensor | None = None
        self.count = 0
        self.groups = groups.ids if groups is not None else None     # sample index -> group id (stack-of-batch)
        self.num_groups = groups.count if groups is not None else 0
        self.group_sums: torch.Tensor | None = None
        self.sample_offset = 0

    def add(self, x: torch.Tensor) -> None:
        b = x.shape[0]
        flat = x.reshape(-1, x.shape[-1]).float()
        if self.needs & {"H", "H_tall"}:
            h = (flat.T @ flat).double()
            self.H = h if self.H is None else self.H + h
        if "abs_mean" in self.needs:
            a = flat.abs().sum(0).double()
            self.abs_sum = a if self.abs_sum is None else self.abs_sum + a
        if "H_stack" in self.needs:
            if self.group_sums is None:
                self.group_sums = torch.zeros(self.num_groups, *x.shape[1:], dtype=torch.float64, device=x.device)
            ids = self.groups[self.sample_offset:self.sample_offset + b].to(x.device)
            self.group_sums.index_add_(0, ids, x.double())
        self.sample_offset += b
        self.count += flat.shape[0]

    def result(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self.H is not None:
            out.update({name: self.H.cpu() for name in sorted(self.needs & {"H", "H_tall"})})
        if self.abs_sum is not None:
            out["abs_mean"] = (self.abs_sum / self.count).cpu()
        if self.group_sums is not None:
            sizes = torch.bincount(self.groups, minlength=self.num_groups).clamp(min=1).to(self.group_sums)
            means = (self.group_sums / sizes[:, None, None]).reshape(-1, self.group_sums.shape[-1])
            out["H_stack"] = (means.T @ means).cpu()
        return out


class _OutputAccumulator:
    """``C_out = sum_t y_t y_t^T`` of one linear's outputs without its bias (``y = W x``), like ``H``: float32
    products summed in float64."""

    def __init__(self, bias: torch.Tensor | None) -> None:
        self.bias = bias
        self.C: torch.Tensor | None = None

    def add(self, y: torch.Tensor) -> None:
        flat = y.reshape(-1, y.shape[-1]).float()
        if self.bias is not None:
            flat = flat - self.bias.float()
        c = (flat.T @ flat).double()
        self.C = c if self.C is None else self.C + c

    def result(self) -> dict[str, torch.Tensor]:
        return {"C_out": self.C.cpu()} if self.C is not None else {}


@contextmanager
def _site_hooks(layer: nn.Module, sites: dict[str, tuple[str, ...]], accumulators: dict[str, _SiteAccumulator],
                outputs: dict[str, _OutputAccumulator] | None = None) -> Iterator[None]:
    """Input-site accumulators on the first linear of their site, output ones on their linear."""
    handles = []
    for site, acc in accumulators.items():
        first = layer.get_submodule(sites[site][0])
        handles.append(first.register_forward_pre_hook(lambda _m, args, acc=acc: acc.add(args[0])))
    for path, acc in (outputs or {}).items():
        linear = layer.get_submodule(path)
        handles.append(linear.register_forward_hook(lambda _m, _args, out, acc=acc: acc.add(out)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def run_layer(layer: nn.Module, inputs: LayerInputs,
              on_output: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> LayerInputs:
    """Run ``layer`` (decoder layer ``inputs.index``) over every batch of ``inputs``, with what the model passes that
    layer; the outputs are the next layer's inputs."""
    outputs = []
    device = next(layer.parameters()).device
    with torch.no_grad():
        for batch, (hidden, (args, kwargs)) in enumerate(zip(inputs.hidden, inputs.calls[inputs.index])):
            hidden = hidden.to(device)           # from disk a batch at a time; in memory already there
            out = _hidden_out(layer(hidden, *args, **kwargs))
            if on_output is not None:
                on_output(hidden, out)
            outputs.append(inputs.keep(batch, out, inputs.index + 1))
    return LayerInputs(outputs, inputs.calls, inputs.index + 1, inputs.disk)


@dataclass
class LayerStats:
    """Statistics of one decoder layer: per site, and the input/output cosine."""
    sites: dict[str, SiteStats]
    cosine: float | None = None


def collect_layer(layer: nn.Module, sites: dict[str, tuple[str, ...]], inputs: LayerInputs, needs: frozenset[str],
                  layer_name: str, groups: StackGroups | None = None) -> tuple[LayerStats, LayerInputs]:
    """One pass of ``layer`` over ``inputs``: its site statistics (input sites, and the outputs of the matrices
    that need ``C_out``), cosine (if needed), and its outputs."""
    targets = [path for paths in sites.values() for path in paths]
    shapes = {path: matrix_shape(layer.get_submodule(path)) for path in targets}
    accumulators = {}
    for site, paths in sites.items():
        wanted = site_needs(needs, [shapes[p] for p in paths])
        if wanted:
            accumulators[site] = _SiteAccumulator(wanted, groups)
    output_accs = {p: _OutputAccumulator(layer.get_submodule(p).bias) for p in targets
                   if wants_output_gram(needs, shapes[p])}
    cos_sum, cos_count = 0.0, 0

    def on_output(x: torch.Tensor, y: torch.Tensor) -> None:
        nonlocal cos_sum, cos_count
        if not torch.isfinite(y).all():
            raise NumericalError(f"non-finite hidden states at the output of {layer_name} during calibration.")
        if "cosine" in needs:
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
            cos_sum += cos.double().sum().item()
            cos_count += cos.numel()

    with _site_hooks(layer, sites, accumulators, output_accs):
        outputs = run_layer(layer, inputs, on_output)
    sites = {}
    for site, acc in {**accumulators, **output_accs}.items():
        tensors = acc.result()
        for key, value in tensors.items():
            if not torch.isfinite(value).all():
                raise NumericalError(f"non-finite calibration statistic {key} at {layer_name} ({site}).")
        sites[site] = SiteStats(tensors)
    cosine = cos_sum / cos_count if "cosine" in needs else None
    return LayerStats(sites, cosine), outputs


def collect_statistics(ctx: RunContext, needs: frozenset[str],
                       on_layer: Callable[[int, LayerStats], None] | None = None) -> list[LayerStats]:
    """Statistics of every decoder layer of the (unmodified) ``ctx.model`` on ``ctx.calib_ids``, one layer on
    the device at a time.

    With ``on_layer``, each layer's statistics go to ``on_layer(index, stats)`` as soon as the layer is done
    and are not kept (the result is then empty): the statistics in memory are one layer's, at any depth.
    """
    with activation_storage(ctx) as disk:
        inputs = capture_inputs(ctx.model, ctx.decoder, ctx.calib_ids, ctx.batch_size, ctx.device, disk)
        groups = groups_for(ctx, needs)
        layers = ctx.decoder.layers(ctx.model)
        result = []
        for i in tqdm(range(len(layers)), desc="calibration", unit="layer"):
            layer = layers[i].to(ctx.device)
            stats, inputs = collect_layer(layer, ctx.decoder.sites(i), inputs, needs, ctx.decoder.layer_prefix(i),
                                          groups)
            layers[i].to("cpu")
            if on_layer is None:
                result.append(stats)
            else:
                on_layer(i, stats)
            del stats
        del inputs
    return result


@contextmanager
def activation_storage(ctx: RunContext) -> Iterator[DiskActivations | None]:
    """Where a pass over the layers keeps its activations: ``None`` (in memory) or a memory-mapped file under
    ``$SVDEXP_CACHE/scratch`` (``ctx.activations == "disk"``), removed when the pass ends or fails."""
    if ctx.activations != "disk":
        yield None
        return
    with scratch_file() as path:
        yield DiskActivations(path, ctx.calib_ids.shape[0], ctx.batch_size)


def _gradient_passes(model: nn.Module, weights: dict, input_ids: torch.Tensor, device: torch.device,
                     desc: str) -> Iterator[None]:
    """One backward pass of the LM loss per calibration sample, only ``weights`` requiring gradients; yields after
    each pass (their ``.grad`` set, cleared afterwards). The whole model is on the device meanwhile; its
    ``requires_grad`` flags and place are restored at the end."""
    model.to(device)
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
    try:
        for sample in tqdm(input_ids, desc=desc, unit="sample"):
            ids = sample[None].to(device)
            model(ids, labels=ids, use_cache=False).loss.backward()
            yield
            for w in weights.values():
                w.grad = None
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(requires[n])
        model.to("cpu")


def fisher_information(model: nn.Module, decoder: Decoder, input_ids: torch.Tensor, reduce: str,
                       device: torch.device) -> dict[str, torch.Tensor]:
    """Per targeted matrix, squared LM-loss gradients summed over samples and reduced over ``rows``/``columns``.

    ``rows``: importance of each output row (FWSVD paper), ``columns``: of each input column (ASVD code).
    One backward pass per calibration sample (:func:`_gradient_passes`).
    """
    modules = {f"{decoder.layer_prefix(i)}.{t}": model.get_submodule(f"{decoder.layer_prefix(i)}.{t}")
               for i in range(decoder.num_layers) for t in decoder.targets(i)}
    weights = {name: module.weight for name, module in modules.items()}
    sums = {name: torch.zeros(matrix_shape(module)[0 if reduce == "rows" else 1], dtype=torch.float64)
            for name, module in modules.items()}
    for _ in _gradient_passes(model, weights, input_ids, device, "fisher"):
        for name, w in weights.items():
            g2 = as_matrix_grad(modules[name], w.grad).double() ** 2
            sums[name] += (g2.sum(1) if reduce == "rows" else g2.sum(0)).cpu()
    return sums


def loss_gradients(model: nn.Module, decoder: Decoder, input_ids: torch.Tensor, device: torch.device
                   ) -> list[LayerStats]:
    """Per decoder layer, the LM-loss gradient ``G = sum_samples dLoss/dW`` of each targeted matrix (float32,
    statistic ``grad``, under the matrix's path like ``C_out``). One backward pass per calibration sample
    (:func:`_gradient_passes`), as for :func:`fisher_information`."""
    layers = decoder.layers(model)
    modules = {(i, t): layers[i].get_submodule(t) for i in range(len(layers)) for t in decoder.targets(i)}
    weights = {key: module.weight for key, module in modules.items()}
    sums = {key: torch.zeros(matrix_shape(module), dtype=torch.float32) for key, module in modules.items()}
    for _ in _gradient_passes(model, weights, input_ids, device, "gradient"):
        for key, w in weights.items():
            sums[key] += as_matrix_grad(modules[key], w.grad).float().cpu()
    return [LayerStats({t: SiteStats({"grad": sums[(i, t)]}) for t in decoder.targets(i)}) for i in range(len(layers))]


def stats_to_tensors(stats: list[LayerStats], stat: str) -> dict[str, torch.Tensor]:
    """One statistic of every layer as flat named tensors (``"<layer>/<site>"``, or ``"cosine"``)."""
    if stat == "cosine":
        return {"cosine": torch.tensor([s.cosine for s in stats], dtype=torch.float64)}
    return {f"{i}/{site}": layer.sites[site][stat] for i, layer in enumerate(stats) for site in layer.sites
            if stat in layer.sites[site]}


def tensors_to_stats(entries: dict[str, dict[str, torch.Tensor]], num_layers: int) -> list[LayerStats]:
    """Inverse of :func:`stats_to_tensors` over several statistics."""
    layers = [LayerStats({}) for _ in range(num_layers)]
    for stat, tensors in entries.items():
        if stat == "cosine":
            for layer, value in zip(layers, tensors["cosine"].tolist()):
                layer.cosine = value
            continue
        for name, tensor in tensors.items():
            index, site = name.split("/")
            layer = layers[int(index)]
            layer.sites.setdefault(site, SiteStats({})).tensors[stat] = tensor
    return layers
