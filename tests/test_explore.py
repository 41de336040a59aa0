"""The block-size explorer: ranking, SRAM fit, input checks, atomic CSV."""
import csv

import pytest

from iosim import AttentionShape, IosimError, build_schedule
from iosim.explore import (CSV_COLUMNS, candidate_sizes, explore, format_ranking, rank_key,
                           write_csv)
from iosim.results import write_csv as write_rows

SHAPE = AttentionShape(batch=1, heads=2, seq_len=256, head_dim=64)


@pytest.fixture(scope="module")
def flash2_rows():
    return explore("flash2", SHAPE, hardware="a100-40gb", workers=2, progress=False)


def test_rows_are_ranked_by_time_then_hbm_bytes(flash2_rows):
    keys = [(r.predicted_time_s, r.hbm_bytes) for r in flash2_rows]
    assert keys == sorted(keys)
    assert [rank_key(r) for r in flash2_rows] == sorted(rank_key(r) for r in flash2_rows)


def test_every_pair_fits_and_matches_a_direct_schedule(flash2_rows):
    sram = 166_912  # a100-40gb bytes per block
    pairs = {(r.block_rows, r.block_cols) for r in flash2_rows}
    assert len(pairs) == len(flash2_rows)
    for r in flash2_rows:
        assert r.sram_bytes_per_cta <= sram
        schedule = build_schedule("flash2", SHAPE, r.block_rows, r.block_cols, sram_bytes=sram)
        need = max(k.smem_bytes(SHAPE.head_dim, SHAPE.seq_len) for k in schedule.kernels)
        assert need == r.sram_bytes_per_cta
    # every power-of-two pair up to N=256 fits 163 KiB except those too big
    assert (128, 128) in pairs and (16, 16) in pairs


def test_rows_carry_the_counts():
    rows = explore("flash2", SHAPE, hardware="a100-40gb", model="two-level", workers=1,
                   progress=False, candidates=[64])
    (row,) = rows
    from iosim import simulate

    total = simulate("flash2", SHAPE, block_rows=64, block_cols=64, hardware="a100-40gb",
                     model="two-level").totals
    assert row.hbm_read_bytes == total.hbm_read_bytes
    assert row.hbm_write_bytes == total.hbm_write_bytes
    assert row.flops == total.flops_tensor + total.flops_scalar
    assert row.predicted_time_s == pytest.approx(total.predicted_time_s)
    assert row.bound in ("memory", "compute")


def test_a_tiny_sram_leaves_fewer_pairs(flash2_rows):
    small = explore("flash2", SHAPE, hardware="a100-40gb", sram_bytes=32 * 1024, workers=1,
                    progress=False, model="two-level")
    assert 0 < len(small) < len(flash2_rows)
    assert all(r.sram_bytes_per_cta <= 32 * 1024 for r in small)


def test_candidates():
    assert candidate_sizes(1024) == [16, 32, 64, 128, 256]
    assert candidate_sizes(100) == [16, 32, 64, 100]
    assert candidate_sizes(64, "mult16") == [16, 32, 48, 64]
    assert candidate_sizes(50, [8, 300]) == [8, 50]


@pytest.mark.parametrize("kwargs, message", [
    ({"algorithm": "nope"}, "unknown algorithm"),
    ({"model": "three-level"}, "unknown model"),
    ({"workers": 0}, "workers"),
    ({"candidates": "primes"}, "unknown candidates"),
    ({"candidates": [0]}, "positive"),
    ({"candidates": []}, "empty"),
    ({"sram_bytes": 100}, "no (block_rows, block_cols) pair"),
    ({"hardware": "tpu-v9"}, "unknown hardware preset"),
])
def test_bad_input_is_refused_with_iosim_error(kwargs, message):
    args = {"algorithm": "flash2", "model": "two-level", "workers": 1, "progress": False}
    args.update(kwargs)
    algorithm = args.pop("algorithm")
    with pytest.raises(IosimError, match=message.replace("(", r"\(").replace(")", r"\)")):
        explore(algorithm, SHAPE, **args)


def test_shape_must_be_an_attention_shape():
    with pytest.raises(IosimError, match="AttentionShape"):
        explore("flash2", (1, 2, 256, 64), workers=1, progress=False)


def test_format_ranking(flash2_rows):
    text = format_ranking(flash2_rows[:3])
    lines = text.splitlines()
    assert len(lines) == 4 and "Br" in lines[0] and "predicted" in lines[0]
    assert lines[1].split()[0] == "1"


def test_csv_round_trip(flash2_rows, tmp_path):
    path = tmp_path / "out" / "rank.csv"
    with pytest.raises(IosimError, match="does not exist"):
        write_csv(flash2_rows, path)  # a missing folder is not made up
    path.parent.mkdir()
    write_csv(flash2_rows, path)
    with open(path) as f:
        records = list(csv.DictReader(f))
    assert len(records) == len(flash2_rows)
    assert list(records[0]) == ["rank", *CSV_COLUMNS]
    assert [int(r["block_rows"]) for r in records] == [r.block_rows for r in flash2_rows]
    assert [f.name for f in tmp_path.joinpath("out").iterdir()] == ["rank.csv"]


def test_csv_is_atomic_no_partial_file_on_error(flash2_rows, tmp_path):
    path = tmp_path / "rank.csv"
    path.write_text("old contents\n")
    with pytest.raises(IosimError):
        write_csv(list(flash2_rows) + ["not a row"], path)
    assert path.read_text() == "old contents\n"
    assert [p.name for p in tmp_path.iterdir()] == ["rank.csv"]  # no temp file left behind

    class Boom:
        def __str__(self):
            raise RuntimeError("rendering failed")

    fresh = tmp_path / "fresh.csv"
    with pytest.raises(RuntimeError):
        write_rows(fresh, [{"a": 1}, {"a": Boom()}])
    assert not fresh.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank.csv"]
