"""The two-stage DDIM schedule: noise levels, timesteps, fixed noise, and one loop for numpy and torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tdad.schedule import Schedule, add_noise, fixed_noise, predict_x0, two_stage_reconstruct


def test_alphas_cumprod_matches_linear_betas() -> None:
    s = Schedule()
    betas = np.linspace(1e-4, 0.02, 1000)
    assert s.alphas_cumprod.shape == (1000,)
    assert s.alphas_cumprod[0] == pytest.approx(1 - 1e-4)
    assert s.alphas_cumprod[-1] == pytest.approx(np.prod(1 - betas))
    assert np.all(np.diff(s.alphas_cumprod) < 0)
    assert s.alpha_bar(-1) == 1.0
    assert 0.8 < s.alpha_bar(s.t1) < 0.95 and 0.2 < s.alpha_bar(s.t2) < 0.4


def test_ddim_timesteps_descend_evenly_from_t_start() -> None:
    s = Schedule()
    assert s.ddim_timesteps(120, 5) == [120, 96, 72, 48, 24]
    assert s.ddim_timesteps(350, 5) == [350, 280, 210, 140, 70]
    assert s.ddim_timesteps(10, 1) == [10]


def test_fixed_noise_is_deterministic_float32() -> None:
    a, b = fixed_noise((1, 4, 8, 8), 3), fixed_noise((1, 4, 8, 8), 3)
    assert a.dtype == np.float32 and np.array_equal(a, b)
    assert not np.array_equal(a, fixed_noise((1, 4, 8, 8), 4))
    n1, n2 = Schedule(noise_seed=7).stage_noises((4, 8, 8))
    assert n1.shape == (1, 4, 8, 8) and not np.array_equal(n1, n2)


def test_dict_round_trip_and_overrides() -> None:
    s = Schedule(t1=100, steps2=3)
    assert Schedule.from_dict({**s.to_dict(), "unknown": 1}) == s
    assert s.with_overrides(t2=300, steps1=None) == Schedule(t1=100, steps2=3, t2=300)
    with pytest.raises(ValueError, match="t2"):
        Schedule(t2=1000)
    with pytest.raises(ValueError, match="steps"):
        Schedule(steps1=0)


def _toy_callables():
    """Array-agnostic denoise/fuse/zero_cond (only slicing and scalar arithmetic)."""
    def denoise(z, t, cond):
        return z * 0.3 + cond[:, :4] * 0.2 + t * 1e-3

    def fuse(z, z_rec1):
        return (z - z_rec1) * 0.5 + z_rec1 * 0.1

    def zero_cond(z):
        return z * 0.0

    return denoise, fuse, zero_cond


def test_two_stage_reconstruct_numpy_equals_torch() -> None:
    s = Schedule()
    z0 = np.random.default_rng(0).standard_normal((2, 4, 8, 8), dtype=np.float32)
    n1, n2 = s.stage_noises((4, 8, 8))
    out_np = two_stage_reconstruct(z0, *_toy_callables(), s, n1, n2)
    out_t = two_stage_reconstruct(torch.from_numpy(z0), *_toy_callables(), s, torch.from_numpy(n1),
                                  torch.from_numpy(n2))
    assert out_np.dtype == np.float32 and out_np.shape == z0.shape
    np.testing.assert_allclose(out_np, out_t.numpy(), rtol=1e-5, atol=1e-5)


def test_oracle_denoiser_recovers_z0() -> None:
    s = Schedule(t1=150, steps1=3, t2=400, steps2=4)
    z0 = np.random.default_rng(1).standard_normal((1, 4, 8, 8))
    n1, n2 = (n.astype(np.float64) for n in s.stage_noises((4, 8, 8)))
    seen = []

    def oracle(z_t, t, cond):
        seen.append(t)
        a = s.alpha_bar(t)
        return (z_t - np.sqrt(a) * z0) / np.sqrt(1 - a)

    out = two_stage_reconstruct(z0, oracle, lambda z, r: z - r, lambda z: z * 0.0, s, n1, n2)
    np.testing.assert_allclose(out, z0, atol=1e-9)
    assert seen == s.ddim_timesteps(150, 3) + s.ddim_timesteps(400, 4)


def test_add_noise_and_predict_x0_invert() -> None:
    s = Schedule()
    z0, eps = np.ones((1, 4, 2, 2)), np.full((1, 4, 2, 2), 0.5)
    np.testing.assert_allclose(predict_x0(add_noise(z0, eps, s.alpha_bar(200)), eps, s.alpha_bar(200)), z0)


def test_per_sample_noising_is_the_scalar_formula_per_sample() -> None:
    """Training noises each sample at its own t with the same function the runtimes call with one t."""
    import torch

    s = Schedule()
    rng = np.random.default_rng(0)
    z0, eps = rng.standard_normal((3, 4, 2, 2), np.float32), rng.standard_normal((3, 4, 2, 2), np.float32)
    t = np.array([0, 120, 999])
    batched = add_noise(torch.from_numpy(z0), torch.from_numpy(eps), torch.from_numpy(s.alpha_bars(t))).numpy()
    for i, ti in enumerate(t):
        np.testing.assert_allclose(batched[i], add_noise(z0[i], eps[i], s.alpha_bar(int(ti))), atol=1e-5)
