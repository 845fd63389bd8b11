"""Byte-range decoding, chunk invariance, and the numerics of the per-tensor fit."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from lineage.align import align
from lineage.decode import decoded
from lineage.demo import fp8_dequantize, fp8_quantize
from lineage.engines import accumulate
from lineage.engines import kernel as K
from lineage.fit import blend, single
from lineage.geometry import View, segment
from lineage.options import FitOptions
from lineage.reader import Reader
from lineage.source import resolve
from lineage.stats import from_columns, to_columns
from tests.common import write_model

torch.manual_seed(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_decode_float_dtypes(tmp_path, dtype):
    w = torch.randn(37, 19).to(dtype)
    write_model(tmp_path, {"w": w})
    m = resolve("m", str(tmp_path))
    ix_view = View((segment(m.tensors["w"]),))
    with Reader() as r:
        got = decoded(r, ix_view, 3, 30)
    assert torch.equal(got.to(torch.float64), w[3:30].to(torch.float64))


def _pair_model(tmp_path, name, tensors, shards=1):
    write_model(tmp_path / name, tensors, shards)
    return resolve(name, str(tmp_path / name))


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_fp8_block_scales_cropped_and_in_another_shard(tmp_path, scale_dtype):
    """F8_E4M3 with 128x128 scales (F32 or BF16), blocks cropped at 200x300,
    the scale stored in a different shard from its weight."""
    w = torch.randn(200, 300)
    q, s = fp8_quantize(w)
    s = s.to(scale_dtype)
    ref = fp8_dequantize(q, s)
    folder = tmp_path / "fp8"
    import json

    from safetensors.torch import save_file

    folder.mkdir()
    save_file({"layer.weight": q}, str(folder / "a.safetensors"))
    save_file({"layer.weight_scale_inv": s, "other": torch.zeros(2)}, str(folder / "b.safetensors"))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps(
            {"weight_map": {"layer.weight": "a.safetensors", "layer.weight_scale_inv": "b.safetensors", "other": "b.safetensors"}}
        )
    )
    cand = resolve("fp8", str(folder))
    sus = _pair_model(tmp_path, "bf", {"layer.weight": ref.to(torch.float32)})
    groups, _ = align(sus, [cand])
    (g,) = [g for g in groups if g.tensor == "layer.weight"]
    with Reader() as r:
        st = accumulate(g, r, FitOptions(chunk_bytes=1 << 12))  # a few rows per chunk, crossing block rows
    sg = single(st, "fp8")
    assert sg.exact_frac == 1.0 and sg.rel_dist == 0.0
    # and FP8 storage noise is "a few percent": within the F8 rounding tolerance
    assert 0.005 < (ref - w).norm() / w.norm() < 2.0**-4


def test_integer_tensors_skipped(tmp_path):
    sus = _pair_model(tmp_path, "s", {"ids": torch.arange(10), "w": torch.randn(3, 3)})
    cand = _pair_model(tmp_path, "c", {"ids": torch.arange(10), "w": torch.randn(3, 3)})
    groups, _ = align(sus, [cand])
    g = {g.tensor: g for g in groups}
    assert g["ids"].status == "skipped" and "I64 tensor is not a weight" in g["ids"].reason
    assert g["w"].status == "ok"


def _stats(tmp_path, s, ps, chunk=1 << 30, rows=None):
    sus = _pair_model(tmp_path, "s", {"w": s})
    cands = [_pair_model(tmp_path, f"p{i}", {"w": p}) for i, p in enumerate(ps)]
    groups, _ = align(sus, cands)
    with Reader() as r:
        return accumulate(groups[0], r, FitOptions(chunk_bytes=chunk), rows)


def test_chunking_does_not_change_the_result(tmp_path):
    """A chunk far smaller than the tensor (1 row of 257) gives the same stats."""
    base = torch.randn(257, 64)
    p1 = base + 0.05 * torch.randn(257, 64)
    s = (0.6 * p1 + 0.4 * base).to(torch.bfloat16).float()
    whole = _stats(tmp_path, s, [base, p1])
    tiny = _stats(tmp_path, s, [base, p1], chunk=1)
    assert whole.n == tiny.n == 257 * 64 and whole.exact == tiny.exact
    assert np.allclose(whole.gram, tiny.gram, rtol=1e-12, atol=0)
    b1, b2 = blend(whole), blend(tiny)
    for k in b1.weights:
        assert abs(b1.weights[k] - b2.weights[k]) < 1e-10


def test_row_split_stats_merge_exactly(tmp_path):
    base = torch.randn(100, 32)
    s = base + 0.1 * torch.randn(100, 32)
    whole = _stats(tmp_path, s, [base])
    parts = [_stats(tmp_path, s, [base], rows=(a, b)) for a, b in [(0, 33), (33, 34), (34, 100)]]
    merged = parts[0]
    for p in parts[1:]:
        merged.merge(p)
    assert merged.n == whole.n
    assert np.allclose(merged.gram, whole.gram, rtol=1e-12)
    assert np.allclose(merged.rowgram, whole.rowgram, rtol=1e-12)
    assert np.allclose(merged.colgram, whole.colgram, rtol=1e-12)
    back = from_columns(to_columns(merged))  # the one codec between Stats and its stored columns
    assert np.array_equal(back.gram, merged.gram) and np.array_equal(back.colgram, merged.colgram)
    folded = from_columns(to_columns(merged.fold()))  # a tensor read whole, as stored
    assert folded.colsum is None and np.allclose(folded.colgram, whole.colgram, rtol=1e-12)
    assert single(folded, "p0").z == pytest.approx(single(whole, "p0").z, rel=1e-9)
    with pytest.raises(ValueError, match="folded"):
        folded.merge(parts[1])


def test_blend_recovers_weights_of_near_collinear_parents(tmp_path):
    """Parents 0.999-cosine apart: the raw fit is ill-conditioned, the delta fit is not."""
    base = torch.randn(512, 256, dtype=torch.float64)
    ft = base + 0.02 * torch.randn(512, 256, dtype=torch.float64)
    s = 0.57 * ft + 0.43 * base
    st = _stats(tmp_path, s, [base, ft])
    b = blend(st)
    assert abs(b.weights["p1"] - 0.57) < 1e-9 and abs(b.weights["p0"] - 0.43) < 1e-9
    assert b.cond < 2 and b.raw_cond > 1e3
    assert b.residual_rel < 1e-8 and b.r2 > 1 - 1e-12  # the float64 floor of a Gram-based residual (sqrt eps x |s - b| / |s|)
    # the standard error of an exact fit is ~0; with BF16 storage it reflects the rounding
    st16 = _stats(tmp_path, s.to(torch.bfloat16).float(), [base.float(), ft.float()])
    b16 = blend(st16)
    assert abs(b16.weights["p1"] - 0.57) < 0.005
    assert 1e-5 < b16.se["p1"] < 0.01
    assert 1e-4 < b16.residual_rel < 2.0**-8


def test_blend_weights_do_not_depend_on_base(tmp_path):
    base = torch.randn(300, 40, dtype=torch.float64)
    a = base + 0.05 * torch.randn(300, 40, dtype=torch.float64)
    c = base + 0.05 * torch.randn(300, 40, dtype=torch.float64)
    s = 0.2 * base + 0.5 * a + 0.3 * c + 1e-3 * torch.randn(300, 40, dtype=torch.float64)
    st = _stats(tmp_path, s, [base, a, c])
    fits = [blend(st, base=b) for b in ("p0", "p1", "p2")]
    for f in fits[1:]:
        for k in ("p0", "p1", "p2"):
            assert abs(f.weights[k] - fits[0].weights[k]) < 1e-9
    assert abs(fits[0].weights["p1"] - 0.5) < 0.01
    assert blend(st).base == "p0"  # the medoid of a base and two of its fine-tunes


def test_single_candidate_metrics(tmp_path):
    x = torch.randn(1000, 8, dtype=torch.float64)
    y = torch.randn(1000, 8, dtype=torch.float64)
    st = _stats(tmp_path, x, [x.clone(), y])
    same, other = single(st, "p0"), single(st, "p1")
    assert same.exact_frac == 1.0 and same.rel_dist == 0.0 and same.corr == pytest.approx(1.0)
    assert abs(other.corr) < 5 / math.sqrt(8000) and abs(other.z) < 5
    assert other.rel_dist == pytest.approx(math.sqrt(2), rel=0.05)


def test_nonfinite_values_are_counted(tmp_path):
    x = torch.randn(10, 10)
    x[3, 3] = float("nan")
    st = _stats(tmp_path, x, [torch.randn(10, 10)])
    assert st.nonfinite == {"suspect": 1}


def _group(tmp_path, s, ps):
    sus = _pair_model(tmp_path, "s", {"w": s})
    cands = [_pair_model(tmp_path, f"p{i}", {"w": p}) for i, p in enumerate(ps)]
    return align(sus, cands)[0][0]


@pytest.mark.parametrize(
    "dtypes",
    [(torch.bfloat16,) * 3, (torch.float32,) * 3, (torch.bfloat16, torch.float16, torch.float32), (torch.bfloat16,) * 5],
)
def test_kernel_and_torch_engines_agree(tmp_path, dtypes):
    """The C kernel (raw BF16 or decoded float32 input) and the torch path give
    the same statistics to float64 rounding, for 1 to 4 candidates."""
    if K._kernel is None:
        pytest.skip("lineage._kernel not built")
    base = torch.randn(301, 77)
    xs = [(base + 0.05 * i * torch.randn(301, 77)).to(dt) for i, dt in enumerate(dtypes)]
    xs[0][5, 5] = xs[1][5, 5]  # some exact matches
    g = _group(tmp_path, xs[0], xs[1:])
    with Reader() as r:
        a = accumulate(g, r, FitOptions(chunk_bytes=1 << 14), engine="kernel")
        b = accumulate(g, r, FitOptions(chunk_bytes=1 << 14), engine="torch")
    assert a.n == b.n == 301 * 77 and a.exact == b.exact and a.near == b.near
    assert a.dropped == pytest.approx(b.dropped, rel=1e-10, abs=1e-12)
    assert np.allclose(a.gram, b.gram, rtol=1e-11, atol=1e-11 * float(np.abs(b.gram).max()))
    assert np.allclose(a.sums, b.sums, rtol=1e-9, atol=1e-9 * float(np.abs(b.sums).max()))
    assert np.allclose(a.rowgram, b.rowgram, rtol=1e-11, atol=1e-11 * float(np.abs(b.rowgram).max()))
    assert np.allclose(a.colsum, b.colsum, rtol=1e-9, atol=1e-9 * float(np.abs(b.colsum).max()))
    # and they are the row and column sums of the Y columns, checked against the matrices themselves
    y = [xs[1].double(), *[x.double() - xs[1].double() for x in xs[2:]], xs[0].double() - xs[1].double()]
    assert np.allclose(b.colsum, torch.stack([c.sum(0) for c in y]).numpy(), rtol=1e-9, atol=1e-9)
    rs = torch.stack([c.sum(1) for c in y]).numpy()
    assert np.allclose(b.rowgram, rs @ rs.T, rtol=1e-10, atol=1e-8)


def test_kernel_counts_nonfinite(tmp_path):
    x = torch.randn(64, 64).to(torch.bfloat16)
    x[10, 3] = float("inf")
    g = _group(tmp_path, x, [torch.randn(64, 64).to(torch.bfloat16), torch.randn(64, 64).to(torch.bfloat16)])
    with Reader() as r:
        assert accumulate(g, r, FitOptions(chunk_bytes=1 << 20), engine="kernel").nonfinite == {"suspect": 1}


def test_sampled_ranges_are_deterministic_and_proportional():
    from lineage.sampling import sample_ranges

    full = sample_ranges(0, 10000, 10, 1.0, "t")
    assert full == [(0, 10000)]
    tenth = sample_ranges(0, 10000, 10, 0.1, "t")
    assert tenth == sample_ranges(0, 10000, 10, 0.1, "t")
    assert sum(b - a for a, b in tenth) == 1000
    assert sample_ranges(0, 10000, 10, 0.1, "u") != tenth  # phase depends on the tensor
    assert sum(b - a for a, b in sample_ranges(0, 5, 10, 0.01, "t")) == 5  # at least one block


def _trained_like(rows: int, cols: int, shared: torch.Tensor, seed: int) -> torch.Tensor:
    """Independent elements plus a strong row-structured part: `shared` picks the rows
    (never-seen tokens of an output head) that all move along one model-specific direction."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(cols, generator=g)
    return 0.2 * torch.randn(rows, cols, generator=g) + shared[:, None] * direction[None, :]


@pytest.mark.parametrize("aligned", [False, True])
def test_permutation_null_holds_where_the_structure_free_null_fails(tmp_path, aligned):
    """Unrelated pairs whose rows move together along a model-specific direction (output
    heads: never-seen tokens). The structure-free z (corr * sqrt(n)) spreads far beyond
    N(0, 1); the permutation-null z is N(0, 1) when each model has its own such rows, and
    its sd stays under 1.6 in the worst case, the same rows in both (one tokenizer), which
    shuffling rows cannot know about (README, Evaluation). A real derivative stays far
    above the threshold."""
    rows, cols = 400, 48
    old, new = [], []
    for seed in range(32):
        gen = torch.Generator().manual_seed(1 if aligned else 1000 + seed)
        shared = [(torch.rand(rows, generator=gen) < 0.7).float() for _ in range(2)]
        if aligned:
            shared[1] = shared[0]
        a, b = _trained_like(rows, cols, shared[0], 2 * seed), _trained_like(rows, cols, shared[1], 2 * seed + 1)
        st = _stats(tmp_path, a, [b])
        sg = single(st, "p0")
        old.append(sg.corr * math.sqrt(st.n))
        new.append(sg.z)
    sd = lambda v: math.sqrt(sum(x * x for x in v) / len(v))  # noqa: E731
    assert sd(old) > 4, sd(old)
    assert (sd(new) < 1.6) if aligned else (0.6 < sd(new) < 1.4), sd(new)
    parent = _trained_like(rows, cols, shared[0], 99)
    st = _stats(tmp_path, parent + 0.1 * torch.randn(rows, cols), [parent])
    assert single(st, "p0").z > 6


def test_threads_and_memory_maps_do_not_change_the_result(tmp_path, monkeypatch):
    """The kernel path fits BF16 rows in place in mapped pages with any number of threads,
    or copies them; every variant adds the same pieces in the same order: equal bit for bit."""
    if K._kernel is None:
        pytest.skip("lineage._kernel not built")
    monkeypatch.setattr(K, "KERNEL_VIEW_ELEMENTS", 1 << 13)  # many pieces, rows of 300 columns
    base = torch.randn(999, 300)
    xs = [(base + 0.05 * i * torch.randn(999, 300)).to(torch.bfloat16) for i in range(3)]
    g = _group(tmp_path, xs[0], xs[1:])
    out = {}
    with Reader() as r:
        for threads in (1, 2, 3):
            for mapped in (True, False):
                views = [g.view] + [s.view for s in g.paired]
                order = [s.candidate for s in g.paired]
                ranges = [(0, 999)]
                out[threads, mapped] = K.accumulate(views, order, r, 1 << 30, ranges, threads, mapped)
        assert r.bytes_read == 6 * 3 * 999 * 300 * 2
    ref = out[1, False]
    for key, st in out.items():
        assert st.n == ref.n == 999 * 300 and st.exact == ref.exact and st.near == ref.near, key
        assert st.dropped == ref.dropped, key
        for name in ("gram", "sums", "rowgram", "colsum"):
            assert np.array_equal(getattr(st, name), getattr(ref, name)), (key, name)


def _rss_file_kb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    return 0


def test_mapped_pages_do_not_stay_resident(tmp_path):
    """The in-place fit touches every byte of three 64 MiB tensors through memory maps;
    dropping each chunk's pages keeps the process's file-backed resident memory flat
    (without it, it would grow by the bytes read: worker memory would scale with the model)."""
    if K._kernel is None:
        pytest.skip("lineage._kernel not built")
    base = torch.randn(8192, 4096).to(torch.bfloat16)
    g = _group(tmp_path, base, [base, base])
    with Reader() as r:
        accumulate(g, r, FitOptions(), rows=(0, 64))  # map the files, import what the path needs
        before = _rss_file_kb()
        st = accumulate(g, r, FitOptions(threads=2))
        grown_mb = (_rss_file_kb() - before) / 1024
    assert st.n == 8192 * 4096 and r.bytes_read >= 3 * 64 * 2**20
    assert grown_mb < 24, grown_mb


_PATH_PROBE = """
import sys, json
import numpy as np
from lineage import _kernel
rng = np.random.default_rng(7)
cols, rows, k = 300, 37, 3  # 300 = 37 full steps + a 4-element tail per row
xs = [(rng.standard_normal(rows * cols).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16) for _ in range(k + 1)]
xs[1][::5] = xs[0][::5]  # equal and near-equal elements, for the counts and the dropped energy
out = [np.zeros((k + 1) ** 2), np.zeros(k + 1), np.zeros(2 * k, dtype=np.int64)]
cs, rg, dr = np.zeros((k + 1) * cols), np.zeros((k + 1) ** 2), np.zeros(k)
_kernel.accumulate_bf16(*out, np.full(k, 2.0**-8), xs[0], tuple(xs[1:]), cols, cs, rg, dr)
bits = [a.tobytes().hex() for a in (*out, cs, rg, dr)]
# float32 with a reference 2^25 times smaller than the others: each difference from it needs
# about 49 bits, their products do not fit a double, and a fused multiply-add rounds them
# differently from a multiply then an add (every path must fuse alike)
fs = [rng.standard_normal(rows * cols).astype(np.float32) for _ in range(k + 1)]
fs[1] *= np.float32(2.0**-25)
fs[2][::7] = fs[0][::7] * np.float32(1 + 2**-20)
out = [np.zeros((k + 1) ** 2), np.zeros(k + 1), np.zeros(2 * k, dtype=np.int64)]
cs, rg, dr = np.zeros((k + 1) * cols), np.zeros((k + 1) ** 2), np.zeros(k)
_kernel.accumulate_f32(*out, np.full(k, 2.0**-8), fs[0], tuple(fs[1:]), cols, cs, rg, dr)
bits += [a.tobytes().hex() for a in (*out, cs, rg, dr)]
print(json.dumps({"path": _kernel.path(), "bits": bits}))
"""


def test_every_vector_path_gives_the_same_bits():
    """The AVX-512, AVX2 and generic kernels add the same numbers in the same order, each
    product by a fused multiply-add: their results are equal bit for bit, for BF16 bits
    and for float32 values whose products a double cannot hold (this CPU runs the ones it
    supports)."""
    import json
    import subprocess
    import sys

    if K._kernel is None:
        pytest.skip("lineage._kernel not built")
    got = {}
    for want in ("", "avx2", "generic"):
        env = {**os.environ, "LINEAGE_KERNEL_PATH": want}
        r = subprocess.run([sys.executable, "-c", _PATH_PROBE], env=env, capture_output=True, text=True, check=True)
        d = json.loads(r.stdout)
        got[d["path"]] = d["bits"]
    assert len(got) >= 2, got.keys()  # at least the generic path and this CPU's own
    first = next(iter(got.values()))
    for path, bits in got.items():
        assert bits == first, path
