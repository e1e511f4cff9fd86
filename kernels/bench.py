"""`specrelay kernels bench`: each kernel against its torch reference and the best torch baseline, side by side,
with achieved memory bandwidth as a fraction of the device's peak; then the verify-vs-decode step of a 1B-class
Llama (bench_model.py). Meant for a GPU; `--allow-cpu` runs tiny sizes to check the command and its JSON."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from specrelay.kernels.dispatch import use_triton
from specrelay.kernels.kv_compact import kv_compact_reference_, kv_compact_triton_
from specrelay.kernels.rope_shift import rope_shift_reference_, rope_shift_triton_
from specrelay.kernels.spec_accept import spec_accept_reference, spec_accept_triton
from specrelay.kernels.tree_attention import tree_attention_reference, tree_attention_triton

# Peak DRAM bandwidth in GB/s by device-name fragment, most specific first (vendor data sheets).
PEAK_BANDWIDTH_GBPS: tuple[tuple[str, float], ...] = (
    ("H200", 4800.0), ("H100 NVL", 3900.0), ("H100 PCIe", 2000.0), ("H100", 3350.0), ("GH200", 4000.0),
    ("B200", 8000.0), ("A100-SXM4-80GB", 2039.0), ("A100 80GB PCIe", 1935.0), ("A100", 1555.0),
    ("L40S", 864.0), ("L40", 864.0), ("L4", 300.0), ("A10G", 600.0), ("A10", 600.0), ("RTX 4090", 1008.0),
    ("RTX 3090", 936.0), ("V100", 900.0), ("T4", 320.0),
)  # fmt: skip


@dataclass
class BenchSizes:
    num_seqs: int  # requests verified together
    context_len: int  # cached tokens per request before the tree
    tree_nodes: int  # draft-tree nodes per request (root included)
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    vocab: int  # for speculative acceptance
    num_layers: int  # for RoPE shift and compaction
    relay_span: int  # keys re-rotated by the RoPE shift
    accepted_len: int  # accepted path length moved by compaction, per request
    warmup: int
    iters: int


# 1B-class Llama (Llama 3.2 1B shapes): 32 heads, 8 kv heads, head_dim 64, 16 layers.
GPU_SIZES = BenchSizes(8, 2048, 64, 32, 8, 64, 16, 32000, 16, 2048, 16, warmup=5, iters=50)
CPU_SIZES = BenchSizes(2, 12, 6, 4, 2, 16, 4, 64, 2, 8, 3, warmup=1, iters=2)


def peak_bandwidth_gbps(device_name: str) -> float | None:
    for fragment, gbps in PEAK_BANDWIDTH_GBPS:
        if fragment.lower() in device_name.lower():
            return gbps
    return None


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median milliseconds per call (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def measure(name: str, fn: Callable[[], object] | None, bytes_moved: int, sizes: BenchSizes, device: torch.device,
            peak_gbps: float | None, skip_reason: str = "",
            check: Callable[[], dict] | None = None) -> dict:  # fmt: skip
    """Time fn; `check` runs once first and says how its output compares with the reference's."""
    if fn is None:
        return {"impl": name, "skipped": skip_reason}
    try:
        verdict = check() if check is not None else {}
        ms = time_ms(fn, device, sizes.warmup, sizes.iters)
    except Exception as e:  # a baseline that this torch build or device cannot run is reported, not fatal
        return {"impl": name, "skipped": f"{type(e).__name__}: {e}"[:300]}
    gbps = bytes_moved / (ms * 1e-3) / 1e9
    peak_fraction = _sig(gbps / peak_gbps) if peak_gbps else None
    return {"impl": name, "ms": _sig(ms), "gbps": _sig(gbps), "peak_fraction": peak_fraction, **verdict}


def max_abs_err(got: torch.Tensor, want: torch.Tensor) -> dict:
    return {"max_abs_err_vs_reference": _sig((got.float() - want.float()).abs().max().item()) if want.numel() else 0.0}


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


def kernel_entry(name: str, config: dict, results: list[dict], bytes_moved: int, bytes_note: str) -> dict:
    timed = {r["impl"]: r["ms"] for r in results if "ms" in r}
    baselines = [ms for impl, ms in timed.items() if impl != "triton"]
    speedup = round(min(baselines) / timed["triton"], 3) if "triton" in timed and baselines else None
    return {"name": name, "config": config, "bytes_moved": bytes_moved, "bytes_note": bytes_note,
            "results": results, "triton_speedup_vs_best_torch": speedup}  # fmt: skip


def random_tree_parents(n: int, gen: torch.Generator) -> list[int]:
    """A bushy tree: each node's parent among the earlier nodes, biased towards recent ones (deep paths)."""
    return [-1] + [max(0, i - 1 - int(torch.randint(0, min(i, 4), (1,), generator=gen))) for i in range(1, n)]


def ancestor_mask(parents: list[int]) -> torch.Tensor:  # [n, n] bool
    n = len(parents)
    mask = torch.eye(n, dtype=torch.bool)
    for i in range(1, n):
        mask[i] |= mask[parents[i]]
    return mask


def tree_attention_inputs(sizes: BenchSizes, device: torch.device, dtype: torch.dtype) -> dict:
    gen = torch.Generator().manual_seed(0)
    s, t = sizes.num_seqs, sizes.tree_nodes
    blocks_per_seq = math.ceil((sizes.context_len + t) / sizes.block_size)
    num_blocks = s * blocks_per_seq
    block_tables = torch.randperm(num_blocks, generator=gen).view(s, blocks_per_seq).int()
    cache_shape = (num_blocks, sizes.block_size, sizes.num_kv_heads, sizes.head_dim)
    mask = torch.zeros(s * t, t, dtype=torch.bool)
    for r in range(s):
        mask[r * t : (r + 1) * t] = ancestor_mask(random_tree_parents(t, gen))
    inputs = dict(q=torch.randn(s * t, sizes.num_heads, sizes.head_dim, generator=gen),
                  k_cache=torch.randn(cache_shape, generator=gen), v_cache=torch.randn(cache_shape, generator=gen),
                  block_tables=block_tables, context_lens=torch.full((s,), sizes.context_len, dtype=torch.int32),
                  cu_query_lens=torch.arange(0, s * t + 1, t, dtype=torch.int32), tree_mask=mask)  # fmt: skip
    inputs = {k: v.to(device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}
    return dict(inputs, scale=sizes.head_dim**-0.5)


def bench_tree_attention(sizes: BenchSizes, device: torch.device, dtype: torch.dtype, peak: float | None) -> dict:
    args = tree_attention_inputs(sizes, device, dtype)
    s, t, elem = sizes.num_seqs, sizes.tree_nodes, torch.finfo(dtype).bits // 8
    keys = sizes.context_len + t
    bytes_moved = (2 * s * keys * sizes.num_kv_heads + 2 * s * t * sizes.num_heads) * sizes.head_dim * elem
    # The baselines get each request's keys already gathered into contiguous [s, kv_heads, keys, head_dim]
    # tensors (their gather is not timed): the fairest stand-in for a paged cache they cannot read.
    pos = torch.arange(keys, device=device)
    slots = args["block_tables"][:, pos // sizes.block_size].long() * sizes.block_size + pos % sizes.block_size
    k = args["k_cache"].flatten(0, 1)[slots].permute(0, 2, 1, 3).contiguous()
    v = args["v_cache"].flatten(0, 1)[slots].permute(0, 2, 1, 3).contiguous()
    q = args["q"].view(s, t, sizes.num_heads, sizes.head_dim).transpose(1, 2)
    visible = torch.ones(s, 1, t, keys, dtype=torch.bool, device=device)
    visible[..., sizes.context_len :] = args["tree_mask"].view(s, 1, t, t)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    kernel_ok = use_triton(args["q"])
    want = tree_attention_reference(**args)
    tokens_major = lambda out: out.transpose(1, 2).reshape(want.shape)  # noqa: E731  [s, H, t, D] -> [s·t, H, D]
    run_sdpa = lambda: sdpa(q, k, v, attn_mask=visible, scale=args["scale"], enable_gqa=True)  # noqa: E731
    check_kernel = lambda: max_abs_err(tree_attention_triton(**args), want)  # noqa: E731
    results = [
        measure("triton", (lambda: tree_attention_triton(**args)) if kernel_ok else None, bytes_moved, sizes,
                device, peak, "needs CUDA or TRITON_INTERPRET=1", check_kernel),  # fmt: skip
        measure("reference", lambda: tree_attention_reference(**args), bytes_moved, sizes, device, peak),
        measure("sdpa_mask", run_sdpa, bytes_moved, sizes, device, peak,
                check=lambda: max_abs_err(tokens_major(run_sdpa()), want)),  # fmt: skip
        _measure_flex(q, k, v, args, sizes, device, bytes_moved, peak,
                      lambda out: max_abs_err(tokens_major(out), want)),  # fmt: skip
    ]
    config = {"dtype": str(dtype).removeprefix("torch."), **{k: getattr(sizes, k) for k in (
        "num_seqs", "context_len", "tree_nodes", "num_heads", "num_kv_heads", "head_dim", "block_size")}}  # fmt: skip
    return kernel_entry("tree_attention", config, results, bytes_moved, "K/V of prefix+tree once per kv head, q, out")


def _measure_flex(q, k, v, args: dict, sizes: BenchSizes, device: torch.device, bytes_moved: int,
                  peak: float | None, compare: Callable[[torch.Tensor], dict]) -> dict:  # fmt: skip
    if device.type != "cuda":
        return {"impl": "flex_attention", "skipped": "run on CUDA only"}
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        return {"impl": "flex_attention", "skipped": f"not in this torch: {e}"}
    s, t, ctx = sizes.num_seqs, sizes.tree_nodes, sizes.context_len
    tree = args["tree_mask"].view(s, t, t)

    def mask_mod(b, h, q_idx, kv_idx):
        j = kv_idx - ctx
        return (j < 0) | tree[b, q_idx, j.clamp(min=0)]

    try:
        block_mask = create_block_mask(mask_mod, B=s, H=None, Q_LEN=t, KV_LEN=ctx + t, device=device)
        compiled = torch.compile(flex_attention)
    except Exception as e:
        return {"impl": "flex_attention", "skipped": f"{type(e).__name__}: {e}"[:300]}
    run = lambda: compiled(q, k, v, block_mask=block_mask, scale=args["scale"], enable_gqa=True)  # noqa: E731
    return measure("flex_attention", run, bytes_moved, sizes, device, peak, check=lambda: compare(run()))


def spec_accept_inputs(sizes: BenchSizes, device: torch.device, greedy: bool) -> dict:
    """Trees whose children are drawn from q without replacement; p leans on q, and for greedy the first child
    carries argmax p, so accepted paths are several nodes deep."""
    gen = torch.Generator().manual_seed(1)
    s, n, vocab = sizes.num_seqs, sizes.tree_nodes, sizes.vocab
    q = torch.softmax(torch.randn(s * n, vocab, generator=gen) * 2, -1)
    p = 0.4 * torch.softmax(torch.randn(s * n, vocab, generator=gen) * 2, -1) + 0.6 * q
    tokens, parents = [], []
    for r in range(s):
        par = random_tree_parents(n, gen)
        toks, used = [0], {}
        for i in range(1, n):
            row, siblings = r * n + par[i], used.setdefault(par[i], [])
            if greedy and not siblings:
                token = int(p[row].argmax())
            else:
                weights = q[row].clone()
                weights[siblings] = 0
                token = int(torch.multinomial(weights, 1, generator=gen))
            siblings.append(token)
            toks.append(token)
        tokens += toks
        parents += par
    inputs = dict(tokens=torch.tensor(tokens), parents=torch.tensor(parents), cu_nodes=torch.arange(0, s * n + 1, n),
                  target_probs=p, draft_probs=None if greedy else q, uniforms=torch.rand(s * n, generator=gen),
                  final_uniforms=torch.rand(s, generator=gen))  # fmt: skip
    return dict({k: (v.to(device) if v is not None else None) for k, v in inputs.items()}, greedy=greedy)


def bench_spec_accept(sizes: BenchSizes, device: torch.device, greedy: bool, peak: float | None) -> dict:
    args = spec_accept_inputs(sizes, device, greedy)
    want = spec_accept_reference(**args)
    visited = int((want.num_accepted + 1).sum())

    def check() -> dict:
        got = spec_accept_triton(**args)
        fields = ("num_accepted", "accepted_nodes", "next_token")
        same = all(torch.equal(getattr(got, f), getattr(want, f)) for f in fields)
        return {"matches_reference": same}

    bytes_moved = visited * sizes.vocab * 4 * (1 if greedy else 2)
    kernel_ok = use_triton(args["target_probs"])
    results = [
        measure("triton", (lambda: spec_accept_triton(**args)) if kernel_ok else None, bytes_moved, sizes, device,
                peak, "needs CUDA or TRITON_INTERPRET=1", check),  # fmt: skip
        measure("reference", lambda: spec_accept_reference(**args), bytes_moved, sizes, device, peak),
    ]
    config = {"greedy": greedy, "num_seqs": sizes.num_seqs, "tree_nodes": sizes.tree_nodes, "vocab": sizes.vocab,
              "probs_dtype": "float32", "mean_accepted": round(visited / sizes.num_seqs - 1, 2)}  # fmt: skip
    return kernel_entry("spec_accept_greedy" if greedy else "spec_accept_sampling", config, results, bytes_moved,
                        "p (and q) rows of the visited nodes, read once")  # fmt: skip


def bench_rope_shift(sizes: BenchSizes, device: torch.device, dtype: torch.dtype, peak: float | None) -> dict:
    gen = torch.Generator().manual_seed(2)
    n, elem = sizes.relay_span, torch.finfo(dtype).bits // 8
    num_blocks = math.ceil(2 * n / sizes.block_size)
    shape = (sizes.num_layers, num_blocks, sizes.block_size, sizes.num_kv_heads, sizes.head_dim)
    k_cache = torch.randn(shape, generator=gen).to(device, dtype)
    slots = torch.randperm(num_blocks * sizes.block_size, generator=gen)[:n].to(device)
    delta = torch.randint(-4096, 4096, (n,), generator=gen).to(device)
    inv_freq = (1.0 / 500000.0 ** (torch.arange(0, sizes.head_dim, 2) / sizes.head_dim)).float().to(device)
    bytes_moved = 2 * sizes.num_layers * n * sizes.num_kv_heads * sizes.head_dim * elem
    kernel_ok = use_triton(k_cache)

    def check() -> dict:
        got, want = k_cache.clone(), k_cache.clone()
        rope_shift_triton_(got, slots, delta, inv_freq)
        rope_shift_reference_(want, slots, delta, inv_freq)
        return max_abs_err(got, want)

    results = [
        measure("triton", (lambda: rope_shift_triton_(k_cache, slots, delta, inv_freq)) if kernel_ok else None,
                bytes_moved, sizes, device, peak, "needs CUDA or TRITON_INTERPRET=1", check),  # fmt: skip
        measure("reference", lambda: rope_shift_reference_(k_cache, slots, delta, inv_freq), bytes_moved, sizes,
                device, peak),  # fmt: skip
    ]
    config = {"dtype": str(dtype).removeprefix("torch."), "slots": n, "num_layers": sizes.num_layers,
              "num_kv_heads": sizes.num_kv_heads, "head_dim": sizes.head_dim}  # fmt: skip
    return kernel_entry("rope_shift", config, results, bytes_moved, "each key read and written once")


def bench_kv_compact(sizes: BenchSizes, device: torch.device, dtype: torch.dtype, peak: float | None) -> dict:
    gen = torch.Generator().manual_seed(3)
    s, t, a, elem = sizes.num_seqs, sizes.tree_nodes, sizes.accepted_len, torch.finfo(dtype).bits // 8
    per_seq = math.ceil((sizes.context_len + t) / sizes.block_size) * sizes.block_size
    shape = (sizes.num_layers, s * per_seq // sizes.block_size, sizes.block_size, sizes.num_kv_heads, sizes.head_dim)
    k_cache = torch.randn(shape, generator=gen).to(device, dtype)
    v_cache = torch.randn(shape, generator=gen).to(device, dtype)
    src, dst = [], []
    for r in range(s):  # request r's tree follows its context; the accepted path moves down to the context's end
        tree_start = r * per_seq + sizes.context_len
        src.append(tree_start + torch.sort(torch.randperm(t, generator=gen)[:a]).values)
        dst.append(tree_start + torch.arange(a))
    src_slots, dst_slots = torch.cat(src).to(device), torch.cat(dst).to(device)
    n = src_slots.numel()
    bytes_moved = 2 * 2 * sizes.num_layers * n * sizes.num_kv_heads * sizes.head_dim * elem
    kernel_ok = use_triton(k_cache)

    def check() -> dict:
        got, want = (k_cache.clone(), v_cache.clone()), (k_cache.clone(), v_cache.clone())
        kv_compact_triton_(*got, src_slots, dst_slots)
        kv_compact_reference_(*want, src_slots, dst_slots)
        return {"matches_reference": torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])}

    results = [
        measure("triton", (lambda: kv_compact_triton_(k_cache, v_cache, src_slots, dst_slots)) if kernel_ok else None,
                bytes_moved, sizes, device, peak, "needs CUDA or TRITON_INTERPRET=1", check),  # fmt: skip
        measure("reference", lambda: kv_compact_reference_(k_cache, v_cache, src_slots, dst_slots), bytes_moved,
                sizes, device, peak),  # fmt: skip
    ]
    config = {"dtype": str(dtype).removeprefix("torch."), "slots": n, "num_layers": sizes.num_layers,
              "num_kv_heads": sizes.num_kv_heads, "head_dim": sizes.head_dim}  # fmt: skip
    return kernel_entry("kv_compact", config, results, bytes_moved, "K and V of each moved slot, read and written")


def device_info(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"type": "cpu", "name": "cpu", "peak_bandwidth_gbps": None,
                "peak_note": "CPU smoke run: sizes are tiny and the numbers mean nothing"}  # fmt: skip
    name = torch.cuda.get_device_name(device)
    peak = peak_bandwidth_gbps(name)
    note = "vendor data-sheet peak" if peak else "unknown device: add it to PEAK_BANDWIDTH_GBPS"
    return {"type": "cuda", "name": name, "peak_bandwidth_gbps": peak, "peak_note": note}


def run_bench(device: torch.device, sizes: BenchSizes, model_run: Callable[[], dict]) -> dict:
    import triton  # noqa: F401  (versions below; the kernels need it anyway)

    info = device_info(device)
    peak = info["peak_bandwidth_gbps"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kernels = [
        bench_tree_attention(sizes, device, dtype, peak),
        bench_spec_accept(sizes, device, True, peak),
        bench_spec_accept(sizes, device, False, peak),
        bench_rope_shift(sizes, device, dtype, peak),
        bench_kv_compact(sizes, device, dtype, peak),
    ]
    model = model_run()
    attention = {r["impl"]: r.get("ms") for r in kernels[0]["results"]}
    vs_sdpa = (round(attention["sdpa_mask"] / attention["triton"], 3)
               if attention.get("triton") and attention.get("sdpa_mask") else None)  # fmt: skip
    ratio = model.get("ratio")
    return {
        "device": info,
        "versions": {"torch": torch.__version__, "triton": triton.__version__},
        "sizes": asdict(sizes),
        "kernels": kernels,
        "verify_vs_decode": model,
        "goals": {
            "tree_attention_vs_sdpa_mask": {"target": ">= 2.0", "measured": vs_sdpa,
                                            "met": vs_sdpa is not None and vs_sdpa >= 2.0},
            "verify64_over_decode1": {"target": "<= 1.3", "measured": ratio, "met": ratio is not None and ratio <= 1.3},
        },
    }  # fmt: skip


def format_report(report: dict) -> str:
    dev = report["device"]
    peak = f"{dev['peak_bandwidth_gbps']:.0f} GB/s peak" if dev["peak_bandwidth_gbps"] else dev["peak_note"]
    lines = [f"device: {dev['name']} ({peak})", f"{'kernel':<22}{'impl':<16}{'ms':>10}{'GB/s':>10}{'% peak':>9}"]
    for entry in report["kernels"]:
        for r in entry["results"]:
            if "skipped" in r:
                lines.append(f"{entry['name']:<22}{r['impl']:<16}  skipped: {r['skipped'][:60]}")
                continue
            frac = f"{100 * r['peak_fraction']:.1f}" if r["peak_fraction"] is not None else "-"
            check = ""
            if "matches_reference" in r:
                check = "  same as reference" if r["matches_reference"] else "  DIFFERS FROM REFERENCE"
            elif "max_abs_err_vs_reference" in r:
                check = f"  max |err| {r['max_abs_err_vs_reference']:.3g}"
            lines.append(f"{entry['name']:<22}{r['impl']:<16}{r['ms']:>10.4f}{r['gbps']:>10.1f}{frac:>9}{check}")
    model = report["verify_vs_decode"]
    for row in model.get("batches", []):
        lines.append(f"verify({model['tree_nodes']}) vs decode(1), {row['num_seqs']} request(s): "
                     f"{row['verify_ms']:.3f} ms / {row['decode_ms']:.3f} ms = {row['ratio']:.3f}")  # fmt: skip
    for name, goal in report["goals"].items():
        lines.append(f"goal {name}: target {goal['target']}, measured {goal['measured']}, met={goal['met']}")
    return "\n".join(lines)
