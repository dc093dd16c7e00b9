"""DetailedBalanceNoiseSampler, loss weights and EDM noising against independent truth."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from diffusers import DDIMScheduler, DDPMScheduler

from diadm.noise import DetailedBalanceNoiseSampler, add_noise_at_sigma, edm_precondition, scheduler_sigmas


def _naive_pdf(s, gamma=6.0, eps=0.05, lo=0.002, hi=80.0):
    """Eq. 5 written out literally in float64 (fine at these magnitudes), renormalised on [lo, hi]."""
    z = (math.log(hi ** gamma + eps ** gamma) - math.log(lo ** gamma + eps ** gamma)) / gamma
    return s ** (gamma - 1) / (s ** gamma + eps ** gamma) / z


def test_pdf_matches_eq5_and_integrates_to_one():
    q = DetailedBalanceNoiseSampler()
    grid = np.geomspace(0.002, 80.0, 57)
    np.testing.assert_allclose(q.pdf(grid), _naive_pdf(grid), rtol=1e-12)
    total, err = integrate.quad(q.pdf, 0.002, 80.0, points=[0.02, 0.05, 0.2, 1.0], limit=200)
    assert abs(total - 1.0) < 1e-8
    assert q.pdf(0.001) == 0.0 and q.pdf(81.0) == 0.0


def test_paper_normaliser_when_sigma_min_is_zero():
    q = DetailedBalanceNoiseSampler(sigma_min=0.0, sigma_max=80.0)
    norm = (1 / 6) * math.log((80.0 ** 6 + 0.05 ** 6) / 0.05 ** 6)  # the paper's bracket
    s = 0.3
    assert q.pdf(s) == pytest.approx(s ** 5 / (s ** 6 + 0.05 ** 6) / norm, rel=1e-12)


@pytest.mark.parametrize("x", [0.003, 0.02, 0.05, 0.4, 3.0, 50.0])
def test_cdf_is_integral_of_pdf(x):
    q = DetailedBalanceNoiseSampler()
    value, _ = integrate.quad(q.pdf, 0.002, x, points=[p for p in (0.02, 0.05, 0.2, 1.0) if p < x], limit=200)
    assert q.cdf(x) == pytest.approx(value, abs=1e-10)


def test_icdf_inverts_cdf_and_stays_finite_in_extreme_settings():
    q = DetailedBalanceNoiseSampler()
    u = np.linspace(0, 1, 1001)
    np.testing.assert_allclose(q.cdf(q.icdf(u)), u, atol=1e-12)
    assert q.icdf(0.0) == pytest.approx(0.002, rel=1e-6) and q.icdf(1.0) == pytest.approx(80.0, rel=1e-12)
    # sigma^gamma overflows float64 here (1e4^100); the log-space forms must not
    big = DetailedBalanceNoiseSampler(gamma=100.0, sigma_eps=0.05, sigma_min=1e-6, sigma_max=1e4)
    u = np.array([1e-9, 0.3, 0.999999])
    s = big.icdf(u)
    assert np.isfinite(s).all() and np.isfinite(big.pdf(s)).all()
    np.testing.assert_allclose(big.cdf(s), u, rtol=1e-8)


def test_tensor_inputs_keep_type():
    q = DetailedBalanceNoiseSampler()
    out = q.cdf(torch.tensor([0.01, 1.0]))
    assert torch.is_tensor(out) and out.dtype == torch.float64
    assert isinstance(q.pdf(0.1), float)


def test_sample_sigmas_pass_ks_test():
    q = DetailedBalanceNoiseSampler()
    sigmas = q.sample_sigmas(100_000, generator=torch.Generator().manual_seed(0))
    assert sigmas.dtype == torch.float32 and sigmas.shape == (100_000,)
    assert float(sigmas.min()) >= 0.002 and float(sigmas.max()) <= 80.0
    result = stats.kstest(sigmas.double().numpy(), q.cdf)
    assert result.pvalue > 1e-3
    # and a wrong distribution is detected (guards against a test that cannot fail)
    other = DetailedBalanceNoiseSampler(sigma_eps=0.06)
    assert stats.kstest(sigmas.double().numpy(), other.cdf).pvalue < 1e-6


def test_sample_sigmas_reproducible_with_generator():
    q = DetailedBalanceNoiseSampler()
    a = q.sample_sigmas(16, generator=torch.Generator().manual_seed(3))
    b = q.sample_sigmas(16, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_timestep_probabilities_are_bin_masses():
    q = DetailedBalanceNoiseSampler()
    sched = DDPMScheduler(num_train_timesteps=1000)
    sig = scheduler_sigmas(sched)
    alphabar = sched.alphas_cumprod.double()
    torch.testing.assert_close(sig, ((1 - alphabar) / alphabar).sqrt())
    probs = q.timestep_probabilities(sched)
    assert probs.shape == (1000,) and float(probs.sum()) == pytest.approx(1.0, abs=1e-12)
    # interior bin t: F(sqrt(s_t s_t+1)) - F(sqrt(s_t-1 s_t)), computed independently with the numpy closed form
    s = sig.numpy()
    for t in (1, 50, 400, 998):
        lo, hi = math.sqrt(s[t - 1] * s[t]), math.sqrt(s[t] * s[t + 1])
        mass, _ = integrate.quad(q.pdf, lo, hi)
        assert probs[t].item() == pytest.approx(mass, rel=1e-6, abs=1e-14)
    # edge bins absorb the mass beyond the scheduler's range: all of q below bin 0's upper edge
    assert probs[0].item() == pytest.approx(q.cdf(math.sqrt(s[0] * s[1])), rel=1e-12)
    assert probs[-1].item() == pytest.approx(1 - q.cdf(math.sqrt(s[-2] * s[-1])), rel=1e-9)


def test_sample_timesteps_frequencies_chi_square():
    q = DetailedBalanceNoiseSampler()
    sched = DDIMScheduler(num_train_timesteps=200)
    probs = q.timestep_probabilities(sched).numpy()
    n = 200_000
    t = q.sample_timesteps(n, sched, generator=torch.Generator().manual_seed(1))
    assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) < 200
    observed = np.bincount(t.numpy(), minlength=200).astype(float)
    expected = probs * n
    # merge bins with expected count < 5 into one, then chi-square
    small = expected < 5
    obs = np.append(observed[~small], observed[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    assert stats.chisquare(obs, exp).pvalue > 1e-3
    uniform = np.full(200, n / 200)
    assert stats.chisquare(observed, uniform).pvalue < 1e-6


def test_loss_weights_make_parameterisations_equal():
    torch.manual_seed(0)
    q = DetailedBalanceNoiseSampler()
    sched = DDPMScheduler(num_train_timesteps=1000)
    b = 64
    y, eps = torch.randn(b, 3, 4, 4, dtype=torch.float64), torch.randn(b, 3, 4, 4, dtype=torch.float64)
    eps_hat = eps + 0.3 * torch.randn_like(eps)  # an arbitrary model's prediction, expressed in each form
    per = lambda e: e.pow(2).flatten(1).sum(1)

    # VP (alphabar) convention
    t = q.sample_timesteps(b, sched, generator=torch.Generator().manual_seed(2))
    ab = sched.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    a, s = ab.sqrt(), (1 - ab).sqrt()
    x_t = a * y + s * eps
    y_hat = (x_t - s * eps_hat) / a
    v, v_hat = a * eps - s * y, a * eps_hat - s * y_hat
    ref = per(eps_hat - eps)
    for kind, pred, target in (("epsilon", eps_hat, eps), ("sample", y_hat, y), ("v_prediction", v_hat, v)):
        w = q.loss_weight(kind, timesteps=t, scheduler=sched).double()
        torch.testing.assert_close(w * per(pred - target), ref, rtol=1e-5, atol=1e-8)

    # VE / EDM (sigma) convention
    sig = q.sample_sigmas(b, generator=torch.Generator().manual_seed(3)).double()
    sb = sig.view(-1, 1, 1, 1)
    x = y + sb * eps
    y_hat = x - sb * eps_hat
    c = (1 + sb * sb).sqrt()
    v, v_hat = (eps - sb * y) / c, (eps_hat - sb * y_hat) / c
    for kind, pred, target in (("epsilon", eps_hat, eps), ("sample", y_hat, y), ("v_prediction", v_hat, v)):
        w = q.loss_weight(kind, sigmas=sig).double()
        torch.testing.assert_close(w * per(pred - target), ref, rtol=1e-5, atol=1e-8)
    # diffusers' own VP target for v matches the one used above
    v_vp = (ab.sqrt() * eps - (1 - ab).sqrt() * y).float()
    torch.testing.assert_close(sched.get_velocity(y.float(), eps.float(), t), v_vp, rtol=1e-5, atol=1e-5)


def test_loss_weight_rejects_bad_arguments():
    q = DetailedBalanceNoiseSampler()
    with pytest.raises(ValueError, match="prediction_type"):
        q.loss_weight("flow", sigmas=torch.ones(2))
    with pytest.raises(ValueError, match="exactly one"):
        q.loss_weight("epsilon")
    with pytest.raises(TypeError, match="alphas_cumprod"):
        q.timestep_probabilities(object())


def test_edm_noise_helper_matches_formulas():
    torch.manual_seed(0)
    x = torch.randn(5, 3, 8, 8)
    noise = torch.randn_like(x)
    sig = DetailedBalanceNoiseSampler().sample_sigmas(5, generator=torch.Generator().manual_seed(0))
    out = add_noise_at_sigma(x, sig, noise)
    sb = sig.view(-1, 1, 1, 1)
    torch.testing.assert_close(out.noisy, x + sb * noise)
    sd = 0.5
    torch.testing.assert_close(out.precond.c_skip, sd ** 2 / (sb ** 2 + sd ** 2))
    torch.testing.assert_close(out.precond.c_out, sb * sd / (sb ** 2 + sd ** 2).sqrt())
    torch.testing.assert_close(out.model_input, out.noisy / (sb ** 2 + sd ** 2).sqrt())
    torch.testing.assert_close(out.c_noise, sig.log() / 4)
    # a perfect raw output F = (x - c_skip * noisy) / c_out denoises exactly
    f_star = (x - out.precond.c_skip * out.noisy) / out.precond.c_out
    torch.testing.assert_close(out.denoise(f_star), x, rtol=1e-4, atol=1e-4)
    # generator-drawn noise is reproducible and returned
    a = add_noise_at_sigma(x, sig, generator=torch.Generator().manual_seed(4))
    b = add_noise_at_sigma(x, sig, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.noise, b.noise) and torch.equal(a.noisy, x + sb * a.noise)
    with pytest.raises(ValueError, match="sigmas"):
        add_noise_at_sigma(x, sig[:3], noise)


def test_edm_precondition_matches_diffusers_scheduler():
    from diffusers import EDMEulerScheduler

    sched = EDMEulerScheduler(sigma_data=0.5)
    sig = torch.tensor([0.01, 0.5, 20.0])
    pre = edm_precondition(sig, 0.5)
    sample, model_out = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    for i in range(3):
        torch.testing.assert_close(sched.precondition_inputs(sample[i:i + 1], sig[i]), pre.c_in[i] * sample[i:i + 1])
        torch.testing.assert_close(sched.precondition_noise(sig[i:i + 1]), pre.c_noise[i:i + 1])
        torch.testing.assert_close(sched.precondition_outputs(sample[i:i + 1], model_out[i:i + 1], sig[i]),
                                   pre.c_skip[i] * sample[i:i + 1] + pre.c_out[i] * model_out[i:i + 1])


def test_constructor_validation():
    with pytest.raises(ValueError, match="sigma_min"):
        DetailedBalanceNoiseSampler(sigma_min=100.0)
    with pytest.raises(ValueError, match="gamma"):
        DetailedBalanceNoiseSampler(gamma=0)
