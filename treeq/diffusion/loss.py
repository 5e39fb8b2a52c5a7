"""DiT's training objective: epsilon MSE plus the variational-bound term for learned sigma.

Follows the improved-DDPM `training_losses` that DiT trains with (1000 linear betas,
`learn_sigma=True`, loss type MSE): the vb term sees a detached mean, so it only
trains the variance channels. The schedule tensors come from diffusers'
DDPMScheduler, so training and sampling share one definition of the betas.
"""
import math

import torch
from diffusers import DDPMScheduler

NUM_TRAIN_TIMESTEPS = 1000


def train_scheduler():
    """The DiT schedule as a diffusers scheduler: 1000 steps, betas linear from 1e-4 to 0.02."""
    return DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=1e-4, beta_end=0.02,
                         beta_schedule="linear", variance_type="learned_range", clip_sample=False)


class GaussianDiffusion:
    """Schedule constants (float64 on construction, float32 for use) and the training loss."""

    def __init__(self, scheduler=None):
        scheduler = scheduler or train_scheduler()
        betas = scheduler.betas.double()
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        self.num_timesteps = len(betas)
        constants = {
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
            "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1).sqrt(),
            # log of the posterior variance, clipped because it is 0 at t = 0
            "posterior_log_variance_clipped": torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]])),
            "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod),
            "log_betas": torch.log(betas),
            "snr": alphas_cumprod / (1.0 - alphas_cumprod),
        }
        for name, value in constants.items():
            setattr(self, name, value.float())

    @staticmethod
    def _at(values, t, x):
        """values[t] broadcast to x's shape."""
        return values.to(x.device)[t].view(-1, *([1] * (x.dim() - 1)))

    def q_sample(self, x0, t, noise):
        return self._at(self.sqrt_alphas_cumprod, t, x0) * x0 + self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def q_posterior(self, x0, xt, t):
        mean = self._at(self.posterior_mean_coef1, t, xt) * x0 + self._at(self.posterior_mean_coef2, t, xt) * xt
        return mean, self._at(self.posterior_log_variance_clipped, t, xt)

    def p_mean_log_variance(self, eps, var_values, xt, t):
        """Model's p(x_{t-1} | x_t): variance interpolated in log space between the two DDPM bounds."""
        min_log = self._at(self.posterior_log_variance_clipped, t, xt)
        max_log = self._at(self.log_betas, t, xt)
        frac = (var_values + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        x0 = self._at(self.sqrt_recip_alphas_cumprod, t, xt) * xt - self._at(self.sqrt_recipm1_alphas_cumprod, t, xt) * eps
        mean, _ = self.q_posterior(x0, xt, t)
        return mean, log_variance

    def vb_term(self, x0, xt, t, eps, var_values):
        """KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) in bits per dim; decoder NLL at t = 0."""
        true_mean, true_log_var = self.q_posterior(x0, xt, t)
        mean, log_var = self.p_mean_log_variance(eps, var_values, xt, t)
        kl = 0.5 * (-1.0 + log_var - true_log_var + torch.exp(true_log_var - log_var)
                    + (true_mean - mean) ** 2 * torch.exp(-log_var))
        kl = kl.mean(dim=tuple(range(1, x0.dim()))) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)
        nll = nll.mean(dim=tuple(range(1, x0.dim()))) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model, x0, t, y, noise=None, min_snr_gamma=None, snr_floor=None, **model_kwargs):
        """Per-sample loss: mse(eps) + vb, the MSE weighted by clamp(SNR, snr_floor, min_snr_gamma) / SNR.

        In x0 terms that weight is clamp(SNR, floor, gamma): min-SNR (Hang et al., 2023) caps the
        low-noise end; a floor of 1 is the 'truncated SNR' of Salimans & Ho (2022), which keeps
        high-noise steps, where the global shape of a sample is decided, from weighing nothing.
        """
        noise = torch.randn_like(x0) if noise is None else noise
        xt = self.q_sample(x0, t, noise)
        out = model(xt, t, y, **model_kwargs)
        channels = x0.shape[1]
        eps, var_values = out[:, :channels], out[:, channels:]
        mse = ((noise - eps) ** 2).mean(dim=tuple(range(1, x0.dim())))
        if min_snr_gamma is not None or snr_floor is not None:
            snr = self.snr.to(x0.device)[t]
            mse = mse * torch.clamp(snr, min=snr_floor, max=min_snr_gamma) / snr
        if var_values.shape[1] == 0:
            return mse
        return mse + self.vb_term(x0, xt, t, eps.detach(), var_values)


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of data in [-1, 1] quantised to 256 bins under a Gaussian (exact normal CDF)."""
    normal = torch.distributions.Normal(torch.zeros_like(means), torch.ones_like(means))
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = normal.cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = normal.cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_probs = torch.where(
        x < -0.999, log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log((cdf_plus - cdf_min).clamp(min=1e-12))),
    )
    return log_probs
