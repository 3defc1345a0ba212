"""Noise specs, transition matrices and the noisy labels build_task draws."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nrcore.data import NoiseSpec
from nrcore.data.noise import CIFAR10_ASYM_TARGETS, SYNTHETIC_KINDS, sample_noisy_labels
from nrcore.data.splits import seeded_generator
from nrcore.data.task import task_from_dataset


@given(st.sampled_from(SYNTHETIC_KINDS), st.floats(min_value=0, max_value=100, allow_nan=False))
def test_synthetic_spec_round_trips(kind, percent):
    spec = NoiseSpec(kind, percent)
    assert NoiseSpec.parse(str(spec)) == spec


@pytest.mark.parametrize("text", ["clean", "sym80", "unif12.5", "asym40", "pair45", "flip20", "aggre", "random1", "random2", "random3", "worst", "noisy100", "real"])
def test_spec_strings_round_trip_exactly(text):
    assert str(NoiseSpec.parse(text)) == text
    assert NoiseSpec.parse(NoiseSpec.parse(text)) == NoiseSpec.parse(text)


def test_parse_reads_the_rate():
    assert NoiseSpec.parse("sym80").rate == pytest.approx(0.8)
    assert NoiseSpec.parse(" Sym80 ") == NoiseSpec("sym", 80)
    assert NoiseSpec.parse("clean").rate == 0.0
    assert NoiseSpec.parse("aggre").rate is None and NoiseSpec.parse("aggre").is_real


@pytest.mark.parametrize("bad", ["", "sym", "sym101", "sym-5", "foo80", "aggre10", "80sym", "sym 80", "unif1e3", "clean0"])
def test_malformed_specs_list_the_valid_forms(bad):
    with pytest.raises(ValueError) as err:
        NoiseSpec.parse(bad)
    message = str(err.value)
    assert "symR" in message and "aggre" in message and "noisy100" in message and "\n" not in message


@pytest.mark.parametrize("text, suggestion", [("sym0.2", "sym20"), ("unif0.4", "unif40"), ("pair0.45", "pair45")])
def test_a_rate_given_for_a_percent_is_an_error_that_suggests_the_percent(text, suggestion):
    with pytest.raises(ValueError, match=rf"{text}'?: R is a percent, so this would be .*% noise; for .*% write {suggestion} "):
        NoiseSpec.parse(text)


def test_a_percent_below_one_is_written_with_a_percent_sign():
    spec = NoiseSpec.parse("sym0.5%")
    assert spec == NoiseSpec("sym", 0.5) and spec.rate == pytest.approx(0.005) and str(spec) == "sym0.5%"
    assert NoiseSpec.parse("sym20%") == NoiseSpec.parse("sym20") and str(NoiseSpec.parse("sym20%")) == "sym20"
    assert NoiseSpec.parse("sym0") == NoiseSpec("sym", 0.0) and str(NoiseSpec.parse("sym0")) == "sym0"  # no noise needs no sign


def test_non_string_spec_is_rejected():
    with pytest.raises(ValueError, match="string"):
        NoiseSpec.parse(80)


@pytest.mark.parametrize("text", ["sym30", "unif30", "pair30", "flip30", "asym30", "clean"])
def test_transition_rows_are_distributions(text):
    T = NoiseSpec.parse(text).transition_matrix(10, dataset="cifar10", seed=3)
    assert T.dtype == torch.float64 and T.shape == (10, 10)
    assert torch.allclose(T.sum(1), torch.ones(10, dtype=torch.float64)) and (T >= 0).all()


def test_sym_and_unif_matrices_follow_the_spec_table():
    C, r = 5, 0.3
    sym = NoiseSpec.parse("sym30").transition_matrix(C)
    unif = NoiseSpec.parse("unif30").transition_matrix(C)
    eye = torch.eye(C, dtype=torch.float64)
    assert torch.allclose(sym, (1 - r) * eye + r / (C - 1) * (1 - eye))
    assert torch.allclose(unif, (1 - r) * eye + r / C)
    assert unif[0, 0].item() == pytest.approx(1 - r + r / C)


def test_pair_and_flip_have_one_target_per_class():
    pair = NoiseSpec.parse("pair45").transition_matrix(4)
    assert pair[3, 0].item() == pytest.approx(0.45) and pair[0, 1].item() == pytest.approx(0.45)
    flip_a = NoiseSpec.parse("flip40").transition_matrix(10, seed=1)
    flip_b = NoiseSpec.parse("flip40").transition_matrix(10, seed=1)
    assert torch.equal(flip_a, flip_b)
    off_diagonal = flip_a - torch.diag(flip_a.diagonal())
    assert ((off_diagonal > 0).sum(1) == 1).all()  # exactly one other class per row
    assert not torch.equal(flip_a, NoiseSpec.parse("flip40").transition_matrix(10, seed=2))


def test_cifar10_asym_matrix_is_the_exact_class_map():
    T = NoiseSpec.parse("asym40").transition_matrix(10, dataset="cifar10")
    expected = torch.eye(10, dtype=torch.float64)
    for source, target in {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}.items():  # truck->automobile, bird->airplane, deer->horse, cat<->dog
        expected[source, source] = 0.6
        expected[source, target] = 0.4
    assert torch.equal(T, expected)


def test_cifar100_asym_cycles_inside_each_super_class(writers):
    coarse = writers.coarse_of_fine
    T = NoiseSpec.parse("asym100").transition_matrix(100, dataset="cifar100", coarse_of_class=coarse)
    for group in range(20):
        members = np.flatnonzero(coarse == group)
        for i, c in enumerate(members):
            assert T[c, members[(i + 1) % len(members)]].item() == 1.0
    with pytest.raises(ValueError, match="coarse_of_class"):
        NoiseSpec.parse("asym40").transition_matrix(100, dataset="cifar100")


def test_asym_is_pair_outside_cifar():
    spec = NoiseSpec.parse("asym30")
    assert torch.equal(spec.transition_matrix(10, dataset="mnist"), NoiseSpec.parse("pair30").transition_matrix(10))
    assert "pair30" in spec.describe(10, "mnist")


def test_real_specs_have_no_nominal_matrix():
    with pytest.raises(ValueError, match="real labels"):
        NoiseSpec.parse("aggre").transition_matrix(10)


def test_sampling_never_picks_a_zero_probability_class():
    T = NoiseSpec.parse("pair100").transition_matrix(10)
    true = np.arange(10000) % 10
    noisy = sample_noisy_labels(true, T, seeded_generator(0, "t"))
    assert np.array_equal(noisy, (true + 1) % 10)


# ---- the labels build_task draws ---------------------------------------------------------------------
N, C = 20000, 10


@pytest.fixture(scope="module")
def pool_labels():
    return np.random.default_rng(0).integers(0, C, N)


def _binomial_tolerance(p: float, n: int) -> float:
    return 5 * math.sqrt(max(p * (1 - p), 1e-12) / n) + 1e-12


@pytest.mark.parametrize("text", ["sym20", "sym80", "unif40", "asym40", "pair45", "flip30", "clean"])
def test_realised_rate_is_within_binomial_tolerance(writers, pool_labels, text):
    task = task_from_dataset(writers.synthetic_raw(pool_labels, C), text, seed=4)
    expected = task.info["noise_rate_expected"]
    assert task.noise_rate_realized == pytest.approx(task.info["noise_rate_realized"])
    assert abs(task.noise_rate_realized - expected) <= _binomial_tolerance(expected, len(task.train))
    measured = (task.train.labels != task.train.true_labels).double().mean().item()
    assert measured == pytest.approx(task.noise_rate_realized)


def test_expected_rates_match_the_spec_table(writers, pool_labels):
    raw = writers.synthetic_raw(pool_labels, C)
    assert task_from_dataset(raw, "sym60").info["noise_rate_expected"] == pytest.approx(0.6)
    assert task_from_dataset(raw, "unif60").info["noise_rate_expected"] == pytest.approx(0.6 * (C - 1) / C)
    assert task_from_dataset(raw, "clean").noise_rate_realized == 0.0


def test_unif_keeps_the_true_class_with_probability_1_minus_r_plus_r_over_c(writers, pool_labels):
    r = 0.6
    task = task_from_dataset(writers.synthetic_raw(pool_labels, C), "unif60", seed=2)
    kept = (task.train.labels == task.train.true_labels).double().mean().item()
    p = 1 - r + r / C
    assert abs(kept - p) <= _binomial_tolerance(p, N)


def test_noisy_labels_follow_the_transition_matrix(writers, pool_labels):
    task = task_from_dataset(writers.synthetic_raw(pool_labels, C), "flip40", seed=9)
    true, noisy = task.train.true_labels.numpy(), task.train.labels.numpy()
    T = task.transition_matrix.numpy()
    for c in range(C):
        rows = noisy[true == c]
        for target in np.unique(rows):
            assert T[c, target] > 0
        assert abs((rows == c).mean() - T[c, c]) <= _binomial_tolerance(T[c, c], len(rows))


def test_cifar10_asym_labels_follow_the_map(writers, pool_labels):
    task = task_from_dataset(writers.synthetic_raw(pool_labels, C, name="cifar10"), "asym40", seed=5)
    true, noisy = task.train.true_labels.numpy(), task.train.labels.numpy()
    changed = noisy != true
    assert changed.any()
    assert all(CIFAR10_ASYM_TARGETS[t] == n for t, n in zip(true[changed], noisy[changed]))
    untouched = ~np.isin(true, list(CIFAR10_ASYM_TARGETS))
    assert not changed[untouched].any()


def test_same_seed_same_labels_other_seed_other_labels(writers, pool_labels):
    raw = writers.synthetic_raw(pool_labels, C)
    a = task_from_dataset(raw, "sym50", seed=1, clean_size=100)
    b = task_from_dataset(raw, "sym50", seed=1, clean_size=100)
    c = task_from_dataset(raw, "sym50", seed=2, clean_size=100)
    assert torch.equal(a.train.labels, b.train.labels) and torch.equal(a.train.source_index, b.train.source_index)
    assert not torch.equal(a.train.labels, c.train.labels)


def test_an_example_keeps_its_noisy_label_whatever_the_split_sizes(writers, pool_labels):
    raw = writers.synthetic_raw(pool_labels, C)
    small = task_from_dataset(raw, "sym50", seed=1, clean_size=100)
    large = task_from_dataset(raw, "sym50", seed=1, clean_size=1000, val_size=500)
    label_of = dict(zip(small.train.source_index.tolist(), small.train.labels.tolist()))
    assert all(label_of[i] == y for i, y in zip(large.train.source_index.tolist(), large.train.labels.tolist()))


def test_noise_touches_only_the_noisy_training_set(writers, pool_labels):
    task = task_from_dataset(writers.synthetic_raw(pool_labels, C), "sym80", seed=0, clean_size=500, val_size=300)
    for split in (task.clean, task.val, task.test):
        assert torch.equal(split.labels, split.true_labels)
    assert task.info["sizes"]["train_noisy"] == len(task.train)
