"""The backend-agnostic core against independent computations (no ComfyUI, no diffusers)."""
from __future__ import annotations

import math

import pytest
import torch


def sd_alphas_cumprod() -> torch.Tensor:
    """SD's scaled-linear schedule, computed here independently of the code under test."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


class ToyDenoiser:
    """An analytic, branch-dependent eps(z, sigma) that counts its evaluations."""

    def __init__(self, shift: dict):
        self.shift = shift
        self.calls = 0

    def __call__(self, z, sigma, branch, level, guided=True):
        self.calls += 1
        return 0.1 * torch.tanh(z) + self.shift[branch] / (1.0 + sigma)


def test_schedule_matches_reference_timesteps(core):
    ac = sd_alphas_cumprod()
    sigmas, timesteps = core.ddim_sigmas(((1 - ac) / ac).sqrt(), 50)
    assert timesteps == list(range(0, 1000, 20))  # DDIMScheduler.set_timesteps(50), steps_offset=0, reversed
    assert sigmas.shape == (51,)
    # the clean end sits at alphas_cumprod[0] (set_alpha_to_one=False), as does timestep 0
    assert sigmas[0] == sigmas[1] == math.sqrt((1 - ac[0]) / ac[0])
    assert torch.allclose(sigmas[1:], ((1 - ac[timesteps]) / ac[timesteps]).sqrt())
    with pytest.raises(ValueError, match="at least 1"):
        core.ddim_sigmas(((1 - ac) / ac).sqrt(), 0)
    with pytest.raises(ValueError, match="cannot exceed"):
        core.ddim_sigmas(((1 - ac) / ac).sqrt(), 1001)


def test_ddim_step_is_the_reference_update_in_both_directions(core):
    ac = sd_alphas_cumprod()
    z = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    eps = torch.randn_like(z)
    t, t_prev = 500, 480
    a_t, a_prev = ac[t].item(), ac[t_prev].item()
    # prev_step / next_step of the reference (alpha_bar form)
    x0 = (z - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
    expected_prev = a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps
    sigma = lambda a: math.sqrt((1 - a) / a)  # noqa: E731
    assert torch.allclose(core.ddim_step(z, eps, sigma(a_t), sigma(a_prev)), expected_prev, atol=1e-12)
    # with the same eps, inversion undoes sampling exactly
    back = core.ddim_step(core.ddim_step(z, eps, sigma(a_t), sigma(a_prev)), eps, sigma(a_prev), sigma(a_t))
    assert torch.allclose(back, z, atol=1e-12)


def test_inversion_follows_reference_ddim_loop(core):
    ac = sd_alphas_cumprod()
    sigmas, timesteps = core.ddim_sigmas(((1 - ac) / ac).sqrt(), 10)
    model = ToyDenoiser({"source": 0.3})
    z0 = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    z_star = core.invert_ddim(model, z0, sigmas)

    # The reference loop (prompt-to-prompt null_text ddim_loop / next_step), in timesteps and alphas.
    stride = 1000 // 10
    latent, expected = z0.clone(), [z0]
    for t in timesteps:
        t_cur = t - stride
        a_cur = ac[t_cur].item() if t_cur >= 0 else ac[0].item()  # final_alpha_cumprod
        a_next = ac[t].item()
        eps = model(latent, torch.tensor(math.sqrt((1 - a_next) / a_next), dtype=torch.float64), "source", 0)
        x0 = (latent - (1 - a_cur) ** 0.5 * eps) / a_cur ** 0.5
        latent = a_next ** 0.5 * x0 + (1 - a_next) ** 0.5 * eps
        expected.append(latent)
    assert torch.allclose(z_star, torch.stack(expected), atol=1e-10)


def test_direct_inversion_offsets(core):
    ac = sd_alphas_cumprod()
    sigmas, _ = core.ddim_sigmas(((1 - ac) / ac).sqrt(), 20)
    z0 = torch.randn(2, 4, 8, 8)
    z_star = core.invert_ddim(ToyDenoiser({"source": 0.0}), z0, sigmas)

    # the source branch sees a guided prediction the inversion never saw: without offsets it drifts
    model = ToyDenoiser({"source": 0.5, "target": -0.5})
    plain = core.sample_direct_inversion(model, z_star, sigmas, offsets="off")
    assert (plain.source - z0).abs().max() > 1e-2

    model.calls = 0
    out = core.sample_direct_inversion(model, z_star, sigmas, offsets="source")
    assert (out.source - z0).abs().max() <= 1e-5
    assert torch.equal(out.edited, plain.edited)  # the target branch is left alone
    assert model.calls == 2 * 19  # two branches, 20 steps, one of them zero-length (no evaluation)
    # the offsets are z*_{t-1} - step(z*_t) computed from the source prediction
    s = [float(v) for v in sigmas]
    t = 20
    expected = z_star[t - 1] - core.ddim_step(z_star[t], model(z_star[t], sigmas[t], "source", t), s[t], s[t - 1])
    assert torch.allclose(out.offsets[0], expected, atol=1e-6)

    # "both": identical branches stay identical, so an identity edit is exact
    same = ToyDenoiser({"source": 0.5, "target": 0.5})
    both = core.sample_direct_inversion(same, z_star, sigmas, offsets="both")
    assert (both.edited - z0).abs().max() <= 1e-5


def test_core_errors(core):
    ac = sd_alphas_cumprod()
    sigmas, _ = core.ddim_sigmas(((1 - ac) / ac).sqrt(), 5)
    z0 = torch.randn(1, 4, 8, 8)
    bad = z0.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        core.invert_ddim(ToyDenoiser({"source": 0.0}), bad, sigmas)
    with pytest.raises(ValueError, match="ascending"):
        core.invert_ddim(ToyDenoiser({"source": 0.0}), z0, sigmas.flip(0))
    z_star = core.invert_ddim(ToyDenoiser({"source": 0.0}), z0, sigmas)
    with pytest.raises(ValueError, match="offsets must be one of"):
        core.sample_direct_inversion(ToyDenoiser({}), z_star, sigmas, offsets="sometimes")
    with pytest.raises(ValueError, match="sigmas for a trajectory"):
        core.sample_direct_inversion(ToyDenoiser({}), z_star, sigmas[1:])


class NaNAfter(ToyDenoiser):
    """The toy eps, NaN for one branch from its ``after``-th evaluation on (an overflow)."""

    def __init__(self, branch: str, after: int):
        super().__init__({"source": 0.1, "target": 0.2})
        self.branch, self.after, self.seen = branch, after, 0

    def __call__(self, z, sigma, branch, level, guided=True):
        eps = super().__call__(z, sigma, branch, level, guided)
        if branch == self.branch:
            self.seen += 1
            if self.seen >= self.after:
                return eps * float("nan")
        return eps


@pytest.mark.parametrize("loop", ["invert", "sample", "edict_invert", "edict_sample"])
def test_a_step_that_turns_nan_stops_the_loop_there(core, loop):
    """Every loop stops at the first non-finite step, naming the step and the branch; the model is not called again."""
    ac = sd_alphas_cumprod()
    sigmas, _ = core.ddim_sigmas(((1 - ac) / ac).sqrt(), 8)
    z0 = torch.randn(1, 4, 8, 8, dtype=torch.float64) * 0.5
    z_star = core.invert_ddim(ToyDenoiser({"source": 0.1}), z0, sigmas)
    branch = "source" if "invert" in loop else "target"
    model = NaNAfter(branch, after=3)
    run = {"invert": lambda: core.invert_ddim(model, z0, sigmas),
           "sample": lambda: core.sample_direct_inversion(model, z_star, sigmas),
           "edict_invert": lambda: core.invert_edict(model, z0, sigmas),
           "edict_sample": lambda: core.sample_edict(model, z0, z0, sigmas)}[loop]
    with pytest.raises(ValueError, match=rf"step (\d+) of 8 made the {branch} latent NaN or infinite") as error:
        run()
    step = int(error.value.args[0].split("step ")[1].split(" ")[0])
    # the branch's third evaluation: DDIM makes one per branch and step, EDICT two; inversion's first step is of zero
    # length (no evaluation). The loop stops at that step's end: the branch was evaluated to there and no further.
    expected_step, evaluations = {"invert": (4, 3), "sample": (3, 3), "edict_invert": (3, 4), "edict_sample": (2, 4)}[loop]
    assert step == expected_step and model.seen == evaluations


def test_numbers_are_checked_where_they_enter(core):
    for bad in (float("nan"), float("inf"), 1e30):
        with pytest.raises(ValueError, match="The inversion's cfg must be"):
            core.inversion_guidance("ddim", core.method_options("ddim"), bad)
        with pytest.raises(ValueError, match="null-text guidance must be"):
            core.method_options("null_text", {"guidance": bad})
        with pytest.raises(ValueError, match="EDICT guidance must be"):
            core.method_options("edict", {"guidance": bad})
    with pytest.raises(ValueError, match="null-text lr must be a finite number"):
        core.method_options("null_text", {"lr": float("nan")})
    assert core.check_number("x", "2.5", 0, 3) == 2.5
    with pytest.raises(ValueError, match=r"x must be in \[0, 3\], got 4"):
        core.check_number("x", 4, 0, 3)
    with pytest.raises(ValueError, match="x must be a number, got 'a'"):
        core.check_number("x", "a")
    with pytest.raises(ValueError, match="has dtype torch.int64"):
        core.check_latent_values("latent", torch.zeros(1, 4, 2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="far outside"):
        core.check_latent_values("latent", torch.full((1, 4, 2, 2), 2e4))
    with pytest.raises(ValueError, match="has 16 channels but this model works on 4-channel"):
        core.check_latent_layout("latent", torch.zeros(1, 16, 2, 2), 4)
    with pytest.raises(ValueError, match="image latent"):
        core.check_latent_layout("latent", torch.zeros(1, 4, 3, 2, 2), 4)
