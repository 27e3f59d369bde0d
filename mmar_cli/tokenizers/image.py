"""Continuous image tokenizers: uint8 images <-> float tokens [B, N, D], N = grid h * w.

    patch   p x p x 3 pixel values in [-1, 1]; lossless (uint8 -> tokens -> uint8 is exact, float16 too)
    pca     the same patches projected on their top `pca_dim` principal components (fitted on training
            images), whitened to unit variance: lossy, but far fewer values per token for the diffusion head
    vae     a diffusers AutoencoderKL read from a local directory; latents (posterior mean) scaled to unit
            std, p x p latent positions grouped into one token
    ae      a small convolutional autoencoder trained on the training images (`autoencoder.py`), one token
            per latent position (downsampling p: a p x p pixel block); posterior means normalised to unit
            std per channel. Its decoder's convolutions overlap neighbouring tokens: no block seams

Tokens run over the grid row by row; inside a token the values are ordered (row, column, channel).
`spec()` holds every number needed to rebuild a tokenizer, plus the sha256 of its state, so two shard
directories made with different tokenizers never look alike.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from mmar_cli.errors import UserError

IMAGE_TOKENIZER_FILE = "image_tokenizer.safetensors"


def to_patches(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, H, W, C] -> [B, (H/p)(W/p), p*p*C]."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def from_patches(t: torch.Tensor, grid: tuple[int, int], p: int) -> torch.Tensor:
    """[B, h*w, p*p*C] -> [B, h*p, w*p, C]."""
    (gh, gw), b = grid, t.shape[0]
    c = t.shape[-1] // (p * p)
    t = t.reshape(b, gh, gw, p, p, c).permute(0, 1, 3, 2, 4, 5)
    return t.reshape(b, gh * p, gw * p, c)


def _as_unit_range(images) -> torch.Tensor:
    """uint8 [B, H, W, 3] (numpy or tensor) -> float32 in [-1, 1]."""
    x = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [B, H, W, 3], got {tuple(x.shape)} {x.dtype}")
    # numpy: several times faster than torch's elementwise ops on these small CPU batches
    return torch.from_numpy(x.astype(np.float32) / np.float32(127.5) - np.float32(1.0))


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] -> uint8, rounding to the nearest level (so patch tokens decode exactly)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


class PatchTokenizer:
    kind = "patch"
    value_bound = 1.0  # token values lie in [-1, 1]: sampling may clip to it

    def __init__(self, image_size: int, patch_size: int):
        if image_size % patch_size:
            raise UserError(f"image_tokenizer.patch_size={patch_size} does not divide image_size={image_size}")
        self.image_size, self.patch_size = image_size, patch_size

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return side, side

    @property
    def token_dim(self) -> int:
        return self.patch_size * self.patch_size * 3

    def _check_size(self, images) -> None:
        if tuple(images.shape[1:3]) != (self.image_size, self.image_size):
            raise ValueError(f"expected {self.image_size}x{self.image_size} images, got {tuple(images.shape)}")

    def encode(self, images) -> torch.Tensor:
        """uint8 [B, H, W, 3] (numpy or tensor) -> float32 [B, N, D]."""
        self._check_size(images)
        return to_patches(_as_unit_range(images), self.patch_size)

    def decode(self, tokens) -> np.ndarray:
        """[B, N, D] -> uint8 numpy [B, H, W, 3]."""
        return _to_uint8(from_patches(torch.as_tensor(tokens).float(), self.grid, self.patch_size))

    def spec(self) -> dict:
        return {"kind": self.kind, "image_size": self.image_size, "patch_size": self.patch_size,
                "grid": list(self.grid), "token_dim": self.token_dim}

    def save(self, directory: str | Path) -> None:
        """Stateless: nothing to write."""


class PCATokenizer(PatchTokenizer):
    """Whitened principal components of pixel patches: token = ((patch - mean) @ basis) / std."""

    kind = "pca"
    value_bound = None

    def __init__(self, image_size: int, patch_size: int, mean: torch.Tensor, basis: torch.Tensor,
                 std: torch.Tensor):
        super().__init__(image_size, patch_size)
        self.mean, self.basis, self.std = mean.float(), basis.float(), std.float()

    @classmethod
    def fit(cls, images: np.ndarray, image_size: int, patch_size: int, dim: int) -> "PCATokenizer":
        full = patch_size * patch_size * 3
        if dim > full:
            raise UserError(f"image_tokenizer.pca_dim={dim} exceeds the {full} values of a {patch_size}x"
                            f"{patch_size} patch")
        x = to_patches(_as_unit_range(images), patch_size).reshape(-1, full).double()
        mean = x.mean(0)
        xc = x - mean
        eigval, eigvec = torch.linalg.eigh(xc.T @ xc / len(x))  # ascending order
        eigval, eigvec = eigval.flip(0)[:dim], eigvec.flip(1)[:, :dim]
        # A direction the training patches never vary along would be divided by ~0; floor its std.
        std = eigval.clamp(min=0).sqrt().clamp(min=1e-3 * float(eigval[0].clamp(min=1e-12).sqrt()))
        return cls(image_size, patch_size, mean, eigvec, std)

    @property
    def token_dim(self) -> int:
        return self.basis.shape[1]

    def encode(self, images) -> torch.Tensor:
        self._check_size(images)
        x = to_patches(_as_unit_range(images), self.patch_size)
        return (x - self.mean) @ self.basis / self.std

    def decode(self, tokens) -> np.ndarray:
        x = (torch.as_tensor(tokens).float() * self.std) @ self.basis.T + self.mean
        return _to_uint8(from_patches(x, self.grid, self.patch_size))

    def _state_bytes(self) -> bytes:
        from safetensors.torch import save

        return save({"mean": self.mean.contiguous(), "basis": self.basis.contiguous(),
                     "std": self.std.contiguous()})

    def spec(self) -> dict:
        return {**super().spec(), "pca_dim": self.token_dim, "file": IMAGE_TOKENIZER_FILE,
                "sha256": hashlib.sha256(self._state_bytes()).hexdigest()}

    def save(self, directory: str | Path) -> None:
        Path(directory, IMAGE_TOKENIZER_FILE).write_bytes(self._state_bytes())


class VAETokenizer:
    """A diffusers AutoencoderKL from a local directory (never a hub id)."""

    kind = "vae"
    value_bound = None

    def __init__(self, vae_path: str, image_size: int, patch_size: int, scale: float = 1.0):
        path = Path(vae_path)
        if not (path / "config.json").is_file():
            raise UserError(f"image_tokenizer.vae_path: {path} is not a local AutoencoderKL directory "
                            "(config.json + weights); nothing is downloaded")
        from diffusers import AutoencoderKL

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.vae = AutoencoderKL.from_pretrained(str(path), local_files_only=True).eval().to(self.device)
        self.vae_path, self.image_size, self.patch_size, self.scale = str(path), image_size, patch_size, scale
        self.downsample = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_channels = self.vae.config.latent_channels
        if image_size % (self.downsample * patch_size):
            raise UserError(f"image_size={image_size} is not a multiple of the VAE's downsampling "
                            f"{self.downsample} x image_tokenizer.patch_size={patch_size}")

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // (self.downsample * self.patch_size)
        return side, side

    @property
    def token_dim(self) -> int:
        return self.patch_size * self.patch_size * self.latent_channels

    @torch.no_grad()
    def latents(self, images) -> torch.Tensor:
        """Unscaled posterior means [B, h, w, C] (channels last, ready for `to_patches`)."""
        x = _as_unit_range(images).permute(0, 3, 1, 2).to(self.device)
        return self.vae.encode(x).latent_dist.mean.permute(0, 2, 3, 1).float().cpu()

    def encode(self, images) -> torch.Tensor:
        return to_patches(self.latents(images) * self.scale, self.patch_size)

    @torch.no_grad()
    def decode(self, tokens) -> np.ndarray:
        z = from_patches(torch.as_tensor(tokens).float(), self.grid, self.patch_size) / self.scale
        x = self.vae.decode(z.permute(0, 3, 1, 2).to(self.device)).sample
        return _to_uint8(x.permute(0, 2, 3, 1))

    def weights_sha256(self) -> str:
        digest = hashlib.sha256()
        for f in sorted(Path(self.vae_path).iterdir()):
            if f.is_file():
                digest.update(f.name.encode() + f.read_bytes())
        return digest.hexdigest()

    def spec(self) -> dict:
        return {"kind": self.kind, "image_size": self.image_size, "patch_size": self.patch_size,
                "grid": list(self.grid), "token_dim": self.token_dim, "vae_path": self.vae_path,
                "vae_scale": self.scale, "latent_channels": self.latent_channels,
                "downsample": self.downsample, "sha256": self.weights_sha256()}

    def save(self, directory: str | Path) -> None:
        """The VAE stays where it is; the spec records its path, scale and weights hash."""


class AETokenizer(PatchTokenizer):
    """The convolutional autoencoder of `autoencoder.py`: token = (posterior mean - mean) / std per channel
    at one latent position; `patch_size` is its downsampling (a power of two)."""

    kind = "ae"
    value_bound = None
    ARCH_KEYS = ("ae_channels", "ae_width", "ae_depth")
    TRAIN_KEYS = ("ae_steps", "ae_decoder_steps", "ae_precision", "ae_batch", "ae_lr", "ae_mse", "ae_kl",
                  "ae_images", "ae_seed")
    EARLIER = {"ae_decoder_steps": 0, "ae_precision": "32"}  # what tokenizers written before these keys used

    def __init__(self, image_size: int, patch_size: int, settings: dict, state: Optional[dict] = None):
        super().__init__(image_size, patch_size)
        from mmar_cli.tokenizers import autoencoder

        levels = patch_size.bit_length() - 1
        if patch_size < 2 or 2 ** levels != patch_size:
            raise UserError(f"image_tokenizer.patch_size={patch_size}: the ae tokenizer's downsampling must be a "
                            "power of two (2, 4, 8, ...)")
        settings = {**self.EARLIER, **settings}
        self.settings = {k: settings[k] for k in self.ARCH_KEYS + self.TRAIN_KEYS}
        self.model = autoencoder.Autoencoder(settings["ae_channels"], settings["ae_width"], levels,
                                             settings["ae_depth"], kl=settings["ae_kl"] > 0).eval()
        self.model.requires_grad_(False)
        channels = settings["ae_channels"]
        self.latent_mean, self.latent_std = torch.zeros(channels), torch.ones(channels)
        if state is not None:
            self.model.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")})
            self.latent_mean, self.latent_std = state["latent_mean"].float(), state["latent_std"].float()

    @classmethod
    def fit(cls, images: np.ndarray, image_size: int, patch_size: int, settings: dict, log=print) -> "AETokenizer":
        """Train on uint8 training images [M, H, W, 3] (seeded by ae_seed), then measure each latent
        channel's mean and std on them."""
        from mmar_cli.tokenizers import autoencoder

        with torch.random.fork_rng():
            torch.manual_seed(settings["ae_seed"])  # the initial weights
            tok = cls(image_size, patch_size, settings)
        tok.model.requires_grad_(True)
        log(f"ae: training a {sum(p.numel() for p in tok.model.parameters()) / 1e6:.2f} M parameter autoencoder "
            f"on {len(images)} images for {settings['ae_steps']} steps, then its decoder alone for "
            f"{settings['ae_decoder_steps']} ({settings['ae_precision']})")
        autoencoder.train(tok.model, images, settings["ae_steps"], settings["ae_batch"], settings["ae_lr"],
                          settings["ae_mse"], settings["ae_kl"], settings["ae_seed"],
                          decoder_steps=settings["ae_decoder_steps"], bf16=settings["ae_precision"] == "bf16",
                          log=log)
        tok.model.requires_grad_(False)
        z = autoencoder.latent_means(tok.model, images[:4096]).transpose(0, 1).flatten(1)  # [C, many]
        tok.latent_mean, tok.latent_std = z.mean(1), z.std(1).clamp(min=1e-4)
        return tok

    @property
    def token_dim(self) -> int:
        return self.settings["ae_channels"]

    @torch.no_grad()
    def encode(self, images) -> torch.Tensor:
        self._check_size(images)
        z = self.model.posterior(_as_unit_range(images).permute(0, 3, 1, 2))[0].permute(0, 2, 3, 1)
        return ((z - self.latent_mean) / self.latent_std).reshape(z.shape[0], -1, z.shape[-1])

    @torch.no_grad()
    def decode(self, tokens) -> np.ndarray:
        (h, w), t = self.grid, torch.as_tensor(tokens).float()
        z = (t * self.latent_std + self.latent_mean).reshape(t.shape[0], h, w, -1).permute(0, 3, 1, 2)
        return _to_uint8(self.model.decode(z).permute(0, 2, 3, 1))

    def _state_bytes(self) -> bytes:
        from safetensors.torch import save

        state = {f"model.{k}": v.contiguous() for k, v in self.model.state_dict().items()}
        return save({**state, "latent_mean": self.latent_mean.contiguous(), "latent_std": self.latent_std.contiguous()})

    def spec(self) -> dict:
        return {**super().spec(), **self.settings, "file": IMAGE_TOKENIZER_FILE,
                "sha256": hashlib.sha256(self._state_bytes()).hexdigest()}

    def save(self, directory: str | Path) -> None:
        Path(directory, IMAGE_TOKENIZER_FILE).write_bytes(self._state_bytes())


ImageTokenizer = PatchTokenizer | PCATokenizer | VAETokenizer | AETokenizer


# --------------------------------------------------------------------------------------------------
# Building and loading
# --------------------------------------------------------------------------------------------------
def build_image_tokenizer(cfg, image_size: int, fit_images: Optional[np.ndarray] = None, log=print) -> ImageTokenizer:
    """From an `ImageTokenizerConfig`. `fit_images` (uint8 [M, H, W, 3], training images) fit the PCA
    basis, train the autoencoder, and measure the VAE scale when `vae_scale` is None."""
    if cfg.kind == "patch":
        return PatchTokenizer(image_size, cfg.patch_size)
    if cfg.kind == "pca":
        return PCATokenizer.fit(fit_images, image_size, cfg.patch_size, cfg.pca_dim)
    if cfg.kind == "ae":
        settings = {k: cfg[k] for k in AETokenizer.ARCH_KEYS + AETokenizer.TRAIN_KEYS}
        return AETokenizer.fit(fit_images, image_size, cfg.patch_size, settings, log=log)
    if cfg.vae_path is None:
        raise UserError("image_tokenizer.kind=vae needs image_tokenizer.vae_path (a local AutoencoderKL directory)")
    tok = VAETokenizer(cfg.vae_path, image_size, cfg.patch_size)
    if cfg.vae_scale is not None:
        tok.scale = float(cfg.vae_scale)
    else:
        latents = torch.cat([tok.latents(fit_images[i:i + 64]) for i in range(0, len(fit_images), 64)])
        tok.scale = float(1.0 / latents.std().clamp(min=1e-6))
    return tok


def load_image_tokenizer(directory: str | Path, spec: dict) -> ImageTokenizer:
    """Rebuild the tokenizer a manifest's `spec` describes (the PCA / autoencoder state is read from
    `directory`)."""
    kind = spec["kind"]
    if kind == "patch":
        return PatchTokenizer(spec["image_size"], spec["patch_size"])
    if kind == "vae":
        return VAETokenizer(spec["vae_path"], spec["image_size"], spec["patch_size"], spec["vae_scale"])
    from safetensors.torch import load_file

    path = Path(directory, spec["file"])
    if not path.is_file():
        raise UserError(f"{directory}: missing {spec['file']} (the {kind} image tokenizer of these shards)")
    state = load_file(str(path))
    if kind == "ae":
        tok = AETokenizer(spec["image_size"], spec["patch_size"], spec, state)
    else:
        tok = PCATokenizer(spec["image_size"], spec["patch_size"], state["mean"], state["basis"], state["std"])
    if tok.spec()["sha256"] != spec["sha256"]:
        raise UserError(f"{path} does not match the manifest's image tokenizer (sha256 differs)")
    return tok
