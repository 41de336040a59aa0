"""Inference shapes: grouped K/V heads, a KV cache longer than the queries (end-aligned causal
mask), key padding, dropout and split-KV decode (flash_decoding) — proven by the executor,
traced identically by both trace builders, counted, explored and refused where invalid."""
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import iosim
from iosim.closed_form import hbm_traffic
from iosim.executor import execute
from iosim.explore import explore
from iosim.reference import dropout_keep, reference_attention
from iosim.schedule import PHILOX_BITS_PER_CALL, PHILOX_INSTRUCTIONS_PER_CALL
from iosim.schedules import build_schedule
from iosim.schedules.flash_decoding import num_splits_heuristic, split_size
from iosim.trace import build_trace

FORWARD = ["standard", "hf", "megatron", "flash1", "flash2", "flash3", "flash_decoding"]


def _inputs(shape, seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((shape.batch, shape.heads, shape.seq_len, shape.head_dim))
    k = rng.standard_normal((shape.batch, shape.kv_heads, shape.kv_seq_len, shape.head_dim))
    v = rng.standard_normal(k.shape)
    return q, k, v


def _run(schedule, q, k, v, seed=0):
    shape = schedule.shape
    flat = (q.reshape(-1, shape.seq_len, shape.head_dim),
            k.reshape(-1, shape.kv_seq_len, shape.head_dim),
            v.reshape(-1, shape.kv_seq_len, shape.head_dim))
    return execute(schedule, *flat, seed=seed)


@st.composite
def inference_shapes(draw, algorithm):
    kv_heads = draw(st.integers(1, 2))
    heads = kv_heads * draw(st.integers(1, 3))
    batch = draw(st.integers(1, 2))
    seq_len = draw(st.integers(1, 24))
    causal = draw(st.booleans())
    kv_seq_len = draw(st.integers(seq_len if causal else 1, 60))
    kv_lens = None
    if draw(st.booleans()):
        kv_lens = tuple(draw(st.integers(1, kv_seq_len)) for _ in range(batch))
    dropout = 0.0 if algorithm == "flash_decoding" else draw(st.sampled_from([0.0, 0.25]))
    shape = iosim.AttentionShape(batch, heads, seq_len, draw(st.sampled_from([8, 16])),
                                 causal=causal, kv_heads=kv_heads, kv_seq_len=kv_seq_len,
                                 kv_lens=kv_lens, dropout=dropout)
    rows = shape.group_size * seq_len if algorithm == "flash_decoding" else seq_len
    block_rows = draw(st.integers(1, rows))
    block_cols = draw(st.integers(1, kv_seq_len))
    options = {}
    if algorithm == "flash_decoding":
        options["num_splits"] = draw(st.integers(1, 8))
    return shape, block_rows, block_cols, options


@pytest.mark.parametrize("algorithm", FORWARD)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_every_schedule_computes_attention_on_inference_shapes(algorithm, data):
    shape, br, bc, options = data.draw(inference_shapes(algorithm))
    seed = data.draw(st.integers(0, 2**16))
    schedule = build_schedule(algorithm, shape, br, bc, sram_bytes=1 << 22, **options)
    q, k, v = _inputs(shape, seed)
    out = _run(schedule, q, k, v, seed=seed).output
    ref = reference_attention(q, k, v, causal=shape.causal, kv_lens=shape.kv_lens,
                              dropout=shape.dropout, seed=seed)
    np.testing.assert_allclose(out.reshape(ref.shape), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("algorithm", FORWARD)
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_vectorised_trace_equals_the_walker_on_inference_shapes(algorithm, data):
    shape, br, bc, options = data.draw(inference_shapes(algorithm))
    schedule = build_schedule(algorithm, shape, br, bc, sram_bytes=1 << 22, **options)
    fast, slow = build_trace(schedule), build_trace(schedule, reference=True)
    for a, b in zip(fast.kernels, slow.kernels):
        np.testing.assert_array_equal(a.cta_start, b.cta_start)
        for column in ("kind", "tensor", "addr", "rows", "row_bytes", "row_stride",
                       "flops_tensor", "flops_scalar", "special_ops", "sram_read",
                       "sram_write"):
            np.testing.assert_array_equal(getattr(a, column), getattr(b, column), column)


def test_decode_splits_merge_to_attention_and_combine_only_when_split():
    shape = iosim.AttentionShape(2, 8, 1, 16, kv_heads=2, kv_seq_len=300)
    q, k, v = _inputs(shape, 3)
    ref = reference_attention(q, k, v)
    names = {}
    for splits in (1, 2, 5, 19):
        schedule = build_schedule("flash_decoding", shape, 4, 16, num_splits=splits)
        names[splits] = [kernel.name for kernel in schedule.kernels]
        result = _run(schedule, q, k, v)
        np.testing.assert_allclose(result.output.reshape(ref.shape), ref, atol=1e-12)
        # the log-sum-exp the combine kernel writes is that of the whole row
        lse = result.tensors["L"][..., 0].reshape(2, 8, 1)
        s = np.einsum("bhnd,bhmd->bhnm", q, np.repeat(k, 4, axis=1)) / 4.0
        np.testing.assert_allclose(lse, np.log(np.exp(s).sum(-1)), atol=1e-10)
    assert names[1] == ["flash_decoding_split"]
    assert names[5] == ["flash_decoding_split", "flash_decoding_combine"]


def test_split_size_covers_the_keys_once():
    shape = iosim.AttentionShape(1, 1, 1, 16, kv_seq_len=1000)
    for bc in (16, 64, 128):
        blocks = math.ceil(1000 / bc)
        for requested in range(1, 40):
            per_split, splits = split_size(shape, bc, requested)
            assert splits <= requested
            assert (splits - 1) * per_split < blocks <= splits * per_split


def test_heuristic_leaves_full_grids_alone_and_fills_the_sms_otherwise():
    assert num_splits_heuristic(128, 132, 256) == 1  # 128 CTAs >= 80 % of 132 SMs
    assert num_splits_heuristic(512, 132, 256) == 1
    chosen = num_splits_heuristic(8, 132, 256)  # B=1, 8 K/V heads: 8 CTAs

    def efficiency(s):
        return 8 * s / 132 / math.ceil(8 * s / 132)
    # split counts that change the blocks per split (others would repeat a smaller count)
    distinct = [s for s in range(1, 129)
                if s == 1 or math.ceil(256 / s) != math.ceil(256 / (s - 1))]
    best = max(efficiency(s) for s in distinct)
    assert chosen in distinct and chosen > 1 and efficiency(chosen) >= 0.85 * best
    assert all(efficiency(s) < 0.85 * best for s in distinct if s < chosen)
    assert num_splits_heuristic(4, 132, 3) <= 3  # never more splits than K/V blocks


def test_gqa_group_shares_kv_in_l2_but_not_in_the_two_level_model():
    shape = iosim.AttentionShape(1, 8, 512, 64, kv_heads=2)
    q_bytes, kv_bytes = 8 * 512 * 64 * 2, 2 * 512 * 64 * 2
    l2 = iosim.simulate("flash2", shape, block_rows=128, block_cols=64).totals
    two = iosim.simulate("flash2", shape, block_rows=128, block_cols=64,
                         model="two-level").totals.tensors
    # the group's query heads run adjacent CTAs: K and V come from HBM once per K/V head
    assert l2.hbm_read_bytes <= 1.05 * (q_bytes + 2 * kv_bytes)
    # without an L2 every query head's every Q block reads its K/V head's K
    assert two["K"]["read_bytes"] == 4 * 8 * 512 * 64 * 2


def test_closed_forms_of_grouped_and_cached_shapes():
    for algorithm, shape, br, bc, options in [
            ("flash2", iosim.AttentionShape(2, 6, 64, 32, kv_heads=3, kv_seq_len=256), 32, 64,
             {}),
            ("flash_decoding", iosim.AttentionShape(2, 8, 2, 16, kv_heads=2, kv_seq_len=512),
             4, 32, {"num_splits": 4}),
            ("flash_decoding", iosim.AttentionShape(1, 4, 1, 16, kv_heads=1, kv_seq_len=256),
             4, 64, {"num_splits": 1})]:
        result = iosim.simulate(algorithm, shape, block_rows=br, block_cols=bc,
                                model="two-level", sram_bytes=1 << 22, **options)
        expected = hbm_traffic(algorithm, shape, br, bc, **options)
        assert [k.name for k in result.kernels] == list(expected)
        for kernel in result.kernels:
            reads = {t: v["read_bytes"] for t, v in kernel.tensors.items() if v["read_bytes"]}
            writes = {t: v["write_bytes"] for t, v in kernel.tensors.items()
                      if v["write_bytes"]}
            assert (reads, writes) == (expected[kernel.name]["reads"],
                                       expected[kernel.name]["writes"])


def test_padding_skips_kv_blocks_in_fused_kernels_only():
    full = iosim.AttentionShape(2, 2, 256, 64)
    padded = iosim.AttentionShape(2, 2, 256, 64, kv_lens=(64, 256))

    def kv_read(algorithm, shape):
        t = iosim.simulate(algorithm, shape, block_rows=64, block_cols=64,
                           model="two-level").totals.tensors
        return t["K"]["read_bytes"] + t["V"]["read_bytes"]
    # flash2: batch 0 reads 64 of its 256 keys, batch 1 all: 5/8 of the unpadded K/V reads
    assert kv_read("flash2", padded) * 8 == kv_read("flash2", full) * 5
    assert kv_read("standard", padded) == kv_read("standard", full)


def test_dropout_counts_the_rng_and_the_unfused_mask():
    plain = iosim.AttentionShape(1, 2, 128, 32, causal=False)
    dropped = iosim.AttentionShape(1, 2, 128, 32, dropout=0.1)
    weights = 2 * 128 * 128
    fused = [iosim.simulate("flash2", s, block_rows=64, block_cols=64, model="two-level")
             for s in (plain, dropped)]
    per_weight = 2 + PHILOX_INSTRUCTIONS_PER_CALL / (PHILOX_BITS_PER_CALL // 8)
    assert fused[1].totals.flops_scalar - fused[0].totals.flops_scalar == weights * per_weight
    assert fused[1].totals.hbm_bytes == fused[0].totals.hbm_bytes  # regenerated on chip
    unfused = [iosim.simulate("standard", s, model="two-level") for s in (plain, dropped)]
    kernel = {k.name: k for k in unfused[1].kernels}["dropout"]
    assert kernel.tensors["P"]["read_bytes"] == weights * 2
    assert kernel.tensors["Pd"]["write_bytes"] == weights * 2
    assert kernel.tensors["dropout_mask"]["write_bytes"] == weights  # one byte per weight
    assert unfused[1].totals.hbm_bytes == unfused[0].totals.hbm_bytes + weights * (2 + 2 + 1)


def test_dropout_keep_is_a_fair_counter_based_draw():
    heads, rows, cols = np.meshgrid(np.arange(4), np.arange(64), np.arange(256),
                                    indexing="ij")
    keep = dropout_keep(7, heads, rows, cols, 0.3)
    assert abs(keep.mean() - 0.7) < 0.01
    # the same coordinates give the same draw; a tile of it equals the whole's slice
    np.testing.assert_array_equal(keep[1, 10:20, 30:70],
                                  dropout_keep(7, 1, np.arange(10, 20)[:, None],
                                               np.arange(30, 70)[None, :], 0.3))
    assert (keep != dropout_keep(8, heads, rows, cols, 0.3)).mean() > 0.3


def test_decode_is_memory_bound_and_splits_fill_the_sms():
    shape = iosim.AttentionShape(1, 32, 1, 128, kv_heads=8, kv_seq_len=32768)
    one = iosim.simulate("flash_decoding", shape, num_splits=1)
    default = iosim.simulate("flash_decoding", shape)
    assert one.totals.bound == default.totals.bound == "memory"
    kv_bytes = 2 * 8 * 32768 * 128 * 2
    assert default.totals.hbm_read_bytes >= kv_bytes
    # 8 CTAs without splits stream the cache from 8 SMs: splitting is several times faster
    assert default.totals.predicted_time_s * 2 < one.totals.predicted_time_s


def test_explore_ranks_splits_for_decode():
    shape = iosim.AttentionShape(1, 8, 1, 64, kv_heads=2, kv_seq_len=4096)
    rows = explore("flash_decoding", shape, workers=1, progress=False, candidates=[16, 64])
    assert len({r.num_splits for r in rows}) > 3
    assert rows == sorted(rows, key=lambda r: (r.predicted_time_s, r.hbm_bytes,
                                               r.block_rows, r.block_cols, r.num_splits))
    assert rows[0].num_splits > 1


@pytest.mark.parametrize("kwargs, match", [
    ({"kv_heads": 3}, "kv_heads must divide heads=4"),
    ({"kv_heads": 0}, "kv_heads must be"),
    ({"kv_seq_len": 8, "causal": True}, "kv_seq_len >= seq_len"),
    ({"kv_lens": (4,)}, "one valid key count per batch element"),
    ({"kv_lens": (4, 17)}, r"kv_lens\[1\] must be an integer in 1..kv_seq_len=16"),
    ({"kv_lens": (0, 3)}, r"kv_lens\[0\]"),
    ({"dropout": 1.0}, r"dropout must be a probability in \[0, 1\)"),
    ({"dropout": float("nan")}, "dropout must be a probability"),
])
def test_bad_inference_shapes_are_refused(kwargs, match):
    with pytest.raises(iosim.IosimError, match=match):
        iosim.AttentionShape(2, 4, 16, 8, **kwargs)


def test_backward_of_grouped_shapes_is_refused_with_the_reason():
    shape = iosim.AttentionShape(1, 4, 64, 16, kv_heads=2)
    with pytest.raises(iosim.IosimError, match="backward pass is modelled for kv_heads"):
        iosim.simulate("flash2", shape, pass_="backward")


def test_num_splits_is_refused_for_other_algorithms():
    shape = iosim.AttentionShape(1, 4, 64, 16)
    with pytest.raises(iosim.IosimError, match="num_splits applies to flash_decoding"):
        build_schedule("flash2", shape, num_splits=4)


def test_cli_decode_json_and_one_line_errors(capsys):
    from iosim.cli import main

    code = main(["simulate", "--algorithm", "flash_decoding", "--batch", "2", "--heads", "8",
                 "--kv-heads", "2", "--seq-len", "1", "--kv-seq-len", "2048", "--head-dim",
                 "64", "--num-splits", "4", "--json"])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["shape"]["kv_heads"] == 2 and doc["shape"]["kv_seq_len"] == 2048
    assert [k["name"] for k in doc["kernels"]] == ["flash_decoding_split",
                                                  "flash_decoding_combine"]
    for argv, needle in [(["--kv-heads", "3"], "kv_heads must divide heads=8"),
                         (["--kv-lens", "5,x"], "--kv-lens must be comma-separated"),
                         (["--dropout", "2"], "dropout must be a probability")]:
        code = main(["simulate", "--algorithm", "flash2", "--heads", "8", "--seq-len", "64",
                     "--head-dim", "16"] + argv)
        err = capsys.readouterr().err
        assert code == 2 and needle in err and err.count("\n") == 1
