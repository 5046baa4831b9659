import pytest

from tb_lightning.core.errors import ConfigError, DataError
from tb_lightning.data.sources import Sample
from tb_lightning.data.split import (
    allocate_per_class,
    read_split_csv,
    resolve_val_count,
    stratified_split,
    write_split_csv,
)


def test_seed_split_is_stratified_600_of_4200():
    labels = [0] * 3500 + [1] * 700
    train, val = stratified_split(labels, 600, seed=0)
    assert len(train) == 3600 and len(val) == 600
    assert sum(labels[i] for i in val) == 100  # 600 * 700 / 4200
    assert sum(labels[i] for i in train) == 600
    assert not set(train) & set(val)


def test_fraction_and_reproducibility():
    labels = [0] * 90 + [1] * 30
    a = stratified_split(labels, 0.25, seed=7)
    b = stratified_split(labels, 0.25, seed=7)
    c = stratified_split(labels, 0.25, seed=8)
    assert a == b
    assert a != c
    train, val = a
    assert len(val) == 30
    assert sum(labels[i] for i in val) in (7, 8)  # 30 * 30/120 = 7.5 TB


def test_allocation_sums_to_requested_count():
    for counts, n in [([3500, 700], 600), ([7, 3], 5), ([100, 1], 10), ([51, 49], 33)]:
        assert sum(allocate_per_class(counts, n)) == n


@pytest.mark.parametrize("bad", [0, -3, 120, 1.0, 0.0, "ten", True])
def test_bad_val_size_names_the_key(bad):
    with pytest.raises(ConfigError, match="data.val_size"):
        resolve_val_count(bad, 120)


def test_val_size_that_empties_a_class_is_refused():
    labels = [0] * 50 + [1] * 2
    with pytest.raises(ConfigError, match="no Tuberculosis image"):
        stratified_split(labels, 5, seed=0)  # 5 * 2/52 rounds to 0 TB in val


def test_split_csv_round_trip(tmp_path):
    files = []
    for i in range(6):
        f = tmp_path / f"img{i}.png"
        f.write_bytes(b"x")
        files.append(Sample(str(f), i % 2, f"p{i}", "folder"))
    write_split_csv(tmp_path / "split.csv", files[:4], files[4:])
    train, val = read_split_csv(tmp_path / "split.csv")
    assert train == files[:4] and val == files[4:]


def test_split_csv_with_missing_file_is_refused(tmp_path):
    f = tmp_path / "a.png"
    f.write_bytes(b"x")
    samples = [Sample(str(f), 0, "a", "s"), Sample(str(tmp_path / "gone.png"), 1, "b", "s")]
    write_split_csv(tmp_path / "split.csv", samples[:1], samples[1:])
    with pytest.raises(DataError, match="gone.png"):
        read_split_csv(tmp_path / "split.csv")
    with pytest.raises(DataError, match="data.split_file"):
        read_split_csv(tmp_path / "nope.csv")
