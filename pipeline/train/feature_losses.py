"""Feature distillation from D to B (docs/design.md §4).

* SPD (Space Patched Distillation; BiDM, Zheng et al. 2024): each block feature [B, C, H, W] is cut
  into p x p = 16 non-overlapping patches; per patch the Gram map A = P P^T over its last two axes
  ([B, C, h, h]) is divided by its Frobenius norm (over batch and channels), and the loss is the mean
  over patches of the L2 norm (not squared) of the difference between D's and B's normalised maps.
* LRM (Low-rank Representation Mimicking; BinaryDM, Zheng et al. 2024): a channel PCA of D's block
  features on the first training batch gives a basis E [C, round(C / 4)], frozen from then on (a
  buffer, saved in the checkpoint); the loss is the MSE between D's and B's features projected on E.

Both are averaged over the tapped blocks: the outputs of every down block, the mid block and every up
block of the UNet (the diffusers counterparts of the blocks both papers distil).
"""
import torch
from torch import nn

SPD_PATCHES = 4
LRM_RANK_DIVISOR = 4


def block_names(unet) -> list:
    return ([f"down_blocks.{i}" for i in range(len(unet.down_blocks))] + ["mid_block"]
            + [f"up_blocks.{i}" for i in range(len(unet.up_blocks))])


class FeatureTaps:
    """Keeps the output of the named UNet blocks of a student at every forward."""

    def __init__(self, model):
        self.features = {}
        self.names = block_names(model.unet)
        self.hooks = [model.unet.get_submodule(name).register_forward_hook(self._keeper(name)) for name in self.names]

    def _keeper(self, name):
        def keep(module, args, output):
            self.features[name] = output[0] if isinstance(output, tuple) else output  # down blocks: (h, skips)
        return keep

    def take(self) -> dict:
        features, self.features = self.features, {}
        return features

    def remove(self):
        for h in self.hooks:
            h.remove()


def _patch_grams(f: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] -> normalised Gram maps of the p x p patches, [p*p, B, C, h, h]."""
    b, c, h, w = f.shape
    p = max(1, min(p, h, w))
    ph, pw = h // p, w // p
    patches = f[..., :ph * p, :pw * p].reshape(b, c, p, ph, p, pw).permute(2, 4, 0, 1, 3, 5)
    patches = patches.reshape(p * p, b, c, ph, pw)
    grams = patches @ patches.transpose(-1, -2)
    norms = grams.flatten(1).norm(dim=1).clamp_min(1e-12)
    return grams / norms.view(-1, 1, 1, 1, 1)


def spd_loss(teacher_feats: dict, student_feats: dict) -> torch.Tensor:
    losses = []
    for name, t in teacher_feats.items():
        diff = _patch_grams(t.float(), SPD_PATCHES) - _patch_grams(student_feats[name].float(), SPD_PATCHES)
        losses.append(diff.flatten(1).norm(dim=1).mean())
    return torch.stack(losses).mean()


class LowRankBases(nn.Module):
    """Per-block channel PCA bases of D's features, fitted once on the first batch and then frozen."""

    def __init__(self, unet):
        super().__init__()
        for name in block_names(unet):
            self.register_buffer(self._key(name), torch.zeros(0))
        self.register_buffer("fitted", torch.tensor(False))

    @staticmethod
    def _key(name):
        return "basis_" + name.replace(".", "_")

    @torch.no_grad()
    def fit(self, teacher_feats: dict):
        for name, f in teacher_feats.items():
            x = f.float().permute(0, 2, 3, 1).reshape(-1, f.shape[1])
            x = x - x.mean(dim=0, keepdim=True)
            rank = max(1, round(f.shape[1] / LRM_RANK_DIVISOR))
            # eigenvectors of the channel covariance, largest first
            _, _, v = torch.linalg.svd(x, full_matrices=False)
            setattr(self, self._key(name), v[:rank].T.contiguous())
        self.fitted.fill_(True)

    def loss(self, teacher_feats: dict, student_feats: dict) -> torch.Tensor:
        losses = []
        for name, t in teacher_feats.items():
            e = getattr(self, self._key(name))
            project = lambda f: f.float().permute(0, 2, 3, 1) @ e  # noqa: E731
            losses.append((project(t) - project(student_feats[name])).pow(2).mean())
        return torch.stack(losses).mean()

    def load_fitted(self, state: dict):
        """Restore bases saved with ``state_dict()`` (their shapes are only known after fitting)."""
        for key, value in state.items():
            setattr(self, key, value.clone())
