"""The conversion math on planted spectra: reported errors equal Eckart–Young's, the randomized SVD is
checked against the exact one, rank budgets are minimal, and merges equal PEFT's merge functions."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from adapters_store import TargetLayer
from server.adapters.conversion import Combination, ConversionRefused, SvdConfig, Target
from server.adapters.conversion.budget import choose_ranks
from server.adapters.conversion.combine import combine, layer_seed
from server.adapters.conversion.report import LayerReport, totals
from server.adapters.conversion.spectrum import decompose
from server.adapters.conversion.truncate import truncate
from server.adapters.conversion.updates import LayerUpdate


def orthonormal(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, k, dtype=torch.float64, generator=g)).Q


def planted(out_f: int, in_f: int, sigma: list[float], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ΔW = U diag(σ) Vᵀ with random orthonormal U, V, the σ's as a tensor)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.tensor(sigma, dtype=torch.float64)
    return orthonormal(out_f, len(sigma), g) * s @ orthonormal(in_f, len(sigma), g).T, s


def dense(path: str, M: torch.Tensor) -> LayerUpdate:
    return LayerUpdate(path, M.shape[0], M.shape[1], dense=M)


class Source:
    """An UpdateSource over fixed matrices."""

    def __init__(self, updates: dict[str, LayerUpdate]) -> None:
        self.updates = updates
        self.layers = [TargetLayer(p, u.out_features, u.in_features, False) for p, u in updates.items()]

    def update(self, path: str) -> LayerUpdate:
        return self.updates[path]


def assert_report_is_the_truth(M: torch.Tensor, sigma: torch.Tensor, report: LayerReport, B, A) -> None:
    """Reported errors equal both the theory (from the planted σ) and the factors' actual errors."""
    r = report.rank
    residual = M - B.double() @ A.double()
    tail = math.sqrt(float((sigma[r:] ** 2).sum()))
    next_sigma = float(sigma[r]) if r < len(sigma) else 0.0
    assert report.sigma_next == pytest.approx(next_sigma, rel=1e-9, abs=1e-12)
    assert report.frobenius_error == pytest.approx(tail, rel=1e-9, abs=1e-12)
    assert report.spectral_error_rel == pytest.approx(next_sigma / float(sigma[0]), rel=1e-9, abs=1e-12)
    assert report.frobenius_error_rel == pytest.approx(tail / float(sigma.norm()), rel=1e-9, abs=1e-12)
    # The factors are stored in float32: their actual errors match to float32 rounding.
    assert float(torch.linalg.matrix_norm(residual, ord=2)) == pytest.approx(next_sigma, rel=1e-5, abs=1e-5)
    assert float(torch.linalg.matrix_norm(residual)) == pytest.approx(tail, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("factored", [False, True])
def test_reported_errors_equal_eckart_young_on_planted_spectra(factored):
    sigma = [10.0, 7.0, 5.0, 2.5, 1.0, 0.5, 0.25, 0.1]
    M, s = planted(48, 40, sigma)
    if factored:  # the same ΔW as a LoRA-like product B A (inner dim 8 < 40)
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        g = torch.Generator().manual_seed(3)
        mix = torch.randn(8, 8, dtype=torch.float64, generator=g)  # any invertible mixing keeps B A
        update = LayerUpdate("l", 48, 40, B=U[:, :8] * S[:8] @ mix, A=torch.linalg.inv(mix) @ Vh[:8])
    else:
        update = dense("l", M)
    for r in (1, 3, 5, 8):
        spectrum = decompose(update, keep=r, vectors=True)
        assert spectrum.method == ("factored" if factored else "exact")
        assert torch.allclose(spectrum.sigma[:8], s, rtol=1e-10)
        B, A = (t.float() for t in spectrum.factors(r))
        assert_report_is_the_truth(M, s, LayerReport.of("l", spectrum, r), B, A)


def test_randomized_svd_against_the_exact_one():
    """A 600 x 500 layer with a decaying spectrum, decomposed by the randomized path (exact_max_dim
    lowered so it is taken) and by LAPACK: same leading σ's, and truncations within 1e-6 of optimal."""
    sigma = [float(0.8**i) for i in range(200)]
    M, s = planted(600, 500, sigma, seed=1)
    update = dense("big", M)
    randomized = decompose(update, keep=40, vectors=True, cfg=SvdConfig(exact_max_dim=128))
    exact = decompose(update, keep=40, vectors=True)
    assert (randomized.method, exact.method) == ("randomized", "exact")
    assert not randomized.complete and len(randomized.sigma) == 40 + 1 + SvdConfig().oversample
    assert torch.allclose(randomized.sigma[:41], exact.sigma[:41], rtol=1e-8)
    assert randomized.total_sq == pytest.approx(float((s**2).sum()), rel=1e-12)
    for r in (5, 20, 40):
        B, A = randomized.factors(r)
        actual = float(torch.linalg.matrix_norm(M - B @ A))
        optimal = math.sqrt(float((s[r:] ** 2).sum()))
        assert actual == pytest.approx(optimal, rel=1e-6)
        # The Frobenius error it reports is that of its own factors (a projection of ΔW), exactly.
        assert math.sqrt(randomized.tail_sq(r)) == pytest.approx(actual, rel=1e-6)
        assert randomized.sigma_after(r) == pytest.approx(float(s[r]), rel=1e-8)


def test_rank_deficient_updates_keep_only_their_rank_and_zero_is_rank_zero():
    M, s = planted(30, 20, [3.0, 2.0, 1.0])
    source = Source({"a": dense("a", M), "zero": dense("zero", torch.zeros(30, 20, dtype=torch.float64))})
    for target in (Target(rank=10), Target(energy=1.0), Target(max_relative_error=0.0, scope="layer")):
        result = truncate(source, target, max_rank=64)
        ranks = {layer.path: layer.rank for layer in result.layers}
        assert ranks == {"a": 3, "zero": 0}, target
        assert list(result.factors) == ["a"]
        assert result.layers[0].frobenius_error < 1e-12


def spectra_of(sigmas: dict[str, list[float]], shape=(40, 40)):
    return {
        p: decompose(dense(p, planted(*shape, sig, seed=i)[0]), keep=40, vectors=False)
        for i, (p, sig) in enumerate(sigmas.items())
    }


def test_total_budget_takes_the_fewest_directions_when_layers_share_a_shape():
    """With one shape every direction costs the same, so the fewest parameters means the fewest
    directions: the count of the largest σ²'s (over all layers) needed to reach the energy."""
    g = torch.Generator().manual_seed(5)
    sigmas = {f"l{i}": sorted((torch.rand(12, generator=g) * (i + 1)).tolist(), reverse=True) for i in range(4)}
    spectra = spectra_of(sigmas)
    pooled = sorted((v**2 for sig in sigmas.values() for v in sig), reverse=True)
    total = sum(pooled)
    for energy in (0.5, 0.8, 0.9, 0.99):
        ranks = choose_ranks(spectra, dict.fromkeys(spectra, 40), Target(energy=energy))
        fewest = next(n for n in range(len(pooled) + 1) if sum(pooled[:n]) >= energy * total * (1 - 1e-12))
        assert sum(ranks.values()) == fewest
        kept = sum(sum(v**2 for v in sigmas[p][:r]) for p, r in ranks.items())
        assert kept >= energy * total * (1 - 1e-12)
        # energy e and max_relative_error √(1 − e) are the same target
        same = choose_ranks(spectra, dict.fromkeys(spectra, 40), Target(max_relative_error=math.sqrt(1 - energy)))
        assert same == ranks


def test_total_budget_is_within_one_direction_of_the_cheapest_over_mixed_shapes():
    shapes = {"q": (40, 40), "k": (16, 40), "down": (40, 24)}
    g = torch.Generator().manual_seed(7)
    sigmas = {p: sorted((torch.rand(6, generator=g) * 3).tolist(), reverse=True) for p in shapes}
    spectra = {
        p: decompose(dense(p, planted(*shapes[p], sigmas[p], seed=i)[0]), 6, False) for i, p in enumerate(shapes)
    }
    cost = {p: sum(shape) for p, shape in shapes.items()}
    total = sum(v**2 for sig in sigmas.values() for v in sig)
    for eps in (0.2, 0.4, 0.6):
        ranks = choose_ranks(spectra, dict.fromkeys(shapes, 6), Target(max_relative_error=eps))
        error = sum(sum(v**2 for v in sigmas[p][r:]) for p, r in ranks.items())
        assert error <= eps**2 * total * (1 + 1e-9)
        cheapest = min(  # brute force over every rank combination
            sum(r * cost[p] for p, r in zip(shapes, combo))
            for combo in itertools.product(range(7), repeat=3)
            if sum(sum(v**2 for v in sigmas[p][r:]) for p, r in zip(shapes, combo)) <= eps**2 * total * (1 + 1e-9)
        )
        spent = sum(r * cost[p] for p, r in ranks.items())
        assert cheapest <= spent <= cheapest + max(cost.values())


def test_layer_scope_gives_each_layer_its_smallest_rank():
    sigmas = {"a": [4.0, 2.0, 1.0, 0.5], "b": [1.0, 1.0, 1.0, 1.0]}
    spectra = spectra_of(sigmas)
    ranks = choose_ranks(spectra, dict.fromkeys(sigmas, 40), Target(max_relative_error=0.5, scope="layer"))
    for p, r in ranks.items():
        s = torch.tensor(sigmas[p])
        fits = [k for k in range(5) if float(s[k:].norm()) <= 0.5 * float(s.norm()) + 1e-12]
        assert r == fits[0]


def test_unreachable_targets_under_the_rank_cap_are_refused_naming_the_best_error():
    M, s = planted(32, 32, [1.0] * 16)
    source = Source({"flat": dense("flat", M)})
    with pytest.raises(ConversionRefused, match=r"best reachable relative Frobenius error is 0\.7071"):
        truncate(source, Target(max_relative_error=0.1), max_rank=8)
    with pytest.raises(ConversionRefused, match="at rank 8"):
        truncate(source, Target(energy=0.99, scope="layer"), max_rank=8)
    result = truncate(source, Target(rank=16), max_rank=8)  # a fixed rank is capped, not refused
    assert result.layers[0].rank == 8
    assert totals(result.layers)["frobenius_error_rel"] == pytest.approx(math.sqrt(0.5))


@pytest.mark.parametrize(
    "method, sign",
    [("linear", "total"), ("ties", "total"), ("ties", "frequency"), ("dare_linear", "total")]
    + [("dare_ties", "total"), ("dare_ties", "frequency")],
)
def test_combinations_equal_peft_merge_functions(method, sign):
    from peft.utils import merge_utils

    g = torch.Generator().manual_seed(11)
    deltas = [torch.randn(24, 20, generator=g) for _ in range(3)]
    weights = [0.7, -0.4, 1.3]
    how = Combination(method, None if method == "linear" else 0.6, sign, seed=4)
    seed = layer_seed(how.seed, "model.layers.0.self_attn.q_proj")
    torch.manual_seed(seed)  # PEFT draws DARE's masks from the global generator
    w = torch.tensor(weights)
    theirs = {
        "linear": lambda: merge_utils.task_arithmetic(deltas, w),
        "ties": lambda: merge_utils.ties(deltas, w, 0.6, sign),
        "dare_linear": lambda: merge_utils.dare_linear(deltas, w, 0.6),
        "dare_ties": lambda: merge_utils.dare_ties(deltas, w, 0.6, sign),
    }[method]()
    ours = combine([d.double() for d in deltas], weights, how, torch.Generator().manual_seed(seed))
    assert ours.dtype == torch.float64
    assert torch.allclose(ours.float(), theirs, rtol=1e-5, atol=1e-6)
    if method != "linear":  # and the pruning did something
        assert not torch.allclose(ours, sum(wi * d.double() for wi, d in zip(weights, deltas)))


def test_one_pass_and_two_passes_give_the_same_adapter():
    """Budget targets keep the first pass's singular vectors when they fit in keep_vectors_mb, else
    decompose again: the same ranks and factors either way (exact and randomized layers)."""
    updates = {
        "small": dense("small", planted(40, 30, [float(0.7**i) for i in range(30)], seed=2)[0]),
        "big": dense("big", planted(200, 180, [float(0.9**i) for i in range(150)], seed=3)[0]),
    }
    for target in (Target(energy=0.95), Target(max_relative_error=0.2, scope="layer")):
        runs = [
            truncate(Source(updates), target, max_rank=32, svd=SvdConfig(exact_max_dim=64, keep_vectors_mb=mb))
            for mb in (1024, 0)
        ]
        assert [layer.rank for layer in runs[0].layers] == [layer.rank for layer in runs[1].layers]
        assert {layer.svd for layer in runs[0].layers} == {"exact", "randomized"}
        for p in runs[0].factors:
            one, two = runs[0].factors[p], runs[1].factors[p]
            assert torch.equal(one.B @ one.A, two.B @ two.A)


def test_the_conversion_thread_computes_on_one_core_and_leaves_the_others_alone():
    from concurrent.futures import ThreadPoolExecutor

    from server.cpu_threads import background_thread

    before = torch.get_num_threads()
    with ThreadPoolExecutor(1, initializer=background_thread) as worker:
        assert worker.submit(torch.get_num_threads).result() == 1
    assert torch.get_num_threads() == before
