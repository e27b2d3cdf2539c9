"""Lloyd-Max codebooks: the published N(0,1) centroids, and the exact sphere marginal."""
import math

import pytest

from kernelplane_quant_turboquant.codebook import codebook_for, gaussian_codebook, sphere_codebook

# Positive Lloyd-Max centroids of N(0, 1) (FACTS.md, TurboQuant), 4 decimals.
PUBLISHED = {
    1: [0.7979],
    2: [0.4528, 1.5104],
    3: [0.2451, 0.7560, 1.3439, 2.1519],
    4: [0.1284, 0.3880, 0.6568, 0.9423, 1.2562, 1.6180, 2.0690, 2.7326],
}
# Error per unit vector with a true random rotation at d=128 (FACTS.md).
MEASURED_MSE_D128 = {1: 0.361, 2: 0.116, 3: 0.034, 4: 0.0093}


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_gaussian_centroids_match_the_published_values(bits):
    cb = gaussian_codebook(bits)
    assert [round(c, 4) for c in cb.positive_centroids] == PUBLISHED[bits]
    assert len(cb.centroids) == 2 ** bits and len(cb.thresholds) == 2 ** bits - 1
    assert all(a < b for a, b in zip(cb.centroids, cb.centroids[1:]))
    assert all(abs(c + m) < 1e-12 for c, m in zip(cb.centroids, reversed(cb.centroids)))  # symmetric
    # Lloyd-Max conditions: thresholds midway, and the error inside the paper's bounds
    # (per coordinate in N(0,1) units: 4^-b <= mse <= sqrt(3) pi / 2 * 4^-b).
    assert all(abs(t - (a + b) / 2) < 1e-12 for t, a, b in zip(cb.thresholds, cb.centroids, cb.centroids[1:]))
    assert 4.0 ** -bits < cb.mse < math.sqrt(3) * math.pi / 2 * 4.0 ** -bits


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_sphere_marginal_codebook_at_d128(bits):
    cb = sphere_codebook(bits, 128)
    # Its expected error is what a random rotation measures at d=128 ...
    assert cb.mse == pytest.approx(MEASURED_MSE_D128[bits], rel=0.02)
    # ... and its centroids sit within 2 % of the Gaussian ones (FACTS: "about 1 %"; the outermost move most).
    for c, g in zip(cb.positive_centroids, gaussian_codebook(bits).positive_centroids):
        assert 0 < abs(c / g - 1) < 0.02


def test_sphere_marginal_tends_to_the_gaussian():
    for bits in (2, 4):
        far = sphere_codebook(bits, 1 << 20)
        for c, g in zip(far.centroids, gaussian_codebook(bits).centroids):
            assert c == pytest.approx(g, abs=2e-4)


def test_the_quantizer_uses_the_exact_marginal():
    assert codebook_for(3, 64).distribution == "sphere(64)"


@pytest.mark.parametrize("bad", [0, 5, 2.5, "3"])
def test_bad_bits_are_refused(bad):
    with pytest.raises(ValueError, match="bits must be an integer in 1..4"):
        gaussian_codebook(bad)


def test_bad_dim_is_refused():
    with pytest.raises(ValueError, match="dimension >= 3"):
        sphere_codebook(2, 2)
