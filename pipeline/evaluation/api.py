"""Hold a trained model in Python and call it for images (docs/design.md §5, "The Python API").

    from . import api
    d = api.load("Checkpoints/distill/fashion_mnist")    # D; a packed B or a teacher folder load alike
    images = d(range(16))                                 # uint8 [16, C, H, W] from the x_T of sample indices 0..15

``load`` takes a student D folder (or the train_d run holding one), a packed B folder (or the binarize run holding
one) or a teacher folder in diffusers layout, and returns a ``Generator``: called with sample indices it draws their
x_T exactly as ``--mode generate`` draws them (``seed``, float16-rounded), so image k is the model's answer to the
x_T of teacher record k; called with ``x_T=`` it takes the caller's noise. Students make an image with one network
call, the teacher with a ``steps``-step DDIM chain. ``--mode sample`` and ``eval_d`` make their images through the
same functions, so what a user gets here is what the reports measured. Loading checks every checksum the files
carry; a wrong or damaged folder is one ``UserError`` sentence.
"""
from pathlib import Path

import numpy as np
import torch

from ..core.config_keys import KEYS
from ..core.errors import UserError
from ..teacher import teachers
from ..teacher.trajectory import ddim_sample, draw_x_T
from ..data import datasets
from ..students import packed, student_d

DEFAULT_BATCH = 64
TEACHER_STEPS = 50  # the DDIM chain length of the presets' teacher data


@torch.inference_mode()
def one_step_images(model, x_T: torch.Tensor, batch_size: int = DEFAULT_BATCH, progress=None) -> torch.Tensor:
    """float [-1, 1] images [N, C, H, W] (on the CPU) of a student D or B from ``x_T``, one network call a batch;
    ``progress`` wraps the batch starts (a tqdm, for long runs)."""
    device = next(model.parameters()).device
    starts = range(0, len(x_T), batch_size)
    return torch.cat([student_d.one_step(model, x_T[lo:lo + batch_size].to(device)).float().cpu()
                      for lo in (progress(starts) if progress else starts)])


class Generator:
    """A loaded model that turns x_T into images: ``images(x_T)`` in [-1, 1], ``gen(indices)`` as uint8."""

    kind = ""  # "D", "B" or "teacher": the name reports use

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    @property
    def image_shape(self) -> list:
        raise NotImplementedError

    def images(self, x_T: torch.Tensor, batch_size: int = DEFAULT_BATCH) -> torch.Tensor:
        raise NotImplementedError

    def x_T(self, indices, seed: int = 0) -> torch.Tensor:
        """The x_T that ``--mode generate`` draws for these sample indices with this seed."""
        return draw_x_T(seed, list(indices), self.image_shape)

    def __call__(self, indices=None, *, x_T=None, seed: int = 0, batch_size: int = DEFAULT_BATCH) -> np.ndarray:
        """uint8 images [N, C, H, W] from the x_T of ``indices`` (drawn with ``seed``), or from ``x_T`` itself."""
        if (indices is None) == (x_T is None):
            raise UserError("give the sample indices or x_T=, one of the two")
        return datasets.to_uint8(self.images(self.x_T(indices, seed) if x_T is None else x_T, batch_size))

    def to(self, device):
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}({self.kind} from {self.folder})"


class Student(Generator):
    """D or B: one network call an image."""

    def __init__(self, model, folder: Path, kind: str):
        super().__init__(folder)
        self.model, self.kind = model.eval(), kind

    @property
    def image_shape(self) -> list:
        size = self.model.unet.config.sample_size
        return [self.model.config["image_channels"], size, size]

    def images(self, x_T, batch_size=DEFAULT_BATCH):
        return one_step_images(self.model, x_T, batch_size)

    def to(self, device):
        self.model.to(device)
        return self


class Teacher(Generator):
    """The teacher UNet and its scheduler, sampled by deterministic DDIM in ``steps`` steps."""

    kind = "teacher"

    def __init__(self, unet, ddpm, folder: Path, steps: int = TEACHER_STEPS):
        super().__init__(folder)
        self.unet, self.ddim, self.steps = unet.eval(), teachers.ddim_scheduler(ddpm), steps

    @property
    def image_shape(self) -> list:
        return [self.unet.config.in_channels, self.unet.config.sample_size, self.unet.config.sample_size]

    @torch.inference_mode()
    def images(self, x_T, batch_size=DEFAULT_BATCH):
        device = next(self.unet.parameters()).device
        return torch.cat([ddim_sample(self.unet, self.ddim, x_T[lo:lo + batch_size].to(device), self.steps)
                          .float().clamp(-1, 1).cpu() for lo in range(0, len(x_T), batch_size)])

    def to(self, device):
        self.unet.to(device)
        return self


def load(folder, device="cpu", steps: int = TEACHER_STEPS) -> Generator:
    """The model in ``folder``: a student D, a packed B (or the run folder holding either), or a teacher in
    diffusers layout (sampled with ``steps`` DDIM steps)."""
    path = Path(folder)
    for candidate in (path, path / "student", path / "packed"):
        if (candidate / packed.PACKED_FILE).is_file():
            return Student(packed.load_packed(candidate), candidate, "B").to(device)
        if (candidate / student_d.WEIGHTS_FILE).is_file():
            return Student(student_d.load_student(candidate), candidate, "D").to(device)
    if teachers.has_weights(path) or teachers.has_weights(path / "unet"):
        # the key table's defaults: a teacher folder without scheduler/ gets the default beta schedule
        unet, ddpm, _ = teachers.load_teacher({**{k: spec.default for k, spec in KEYS.items()},
                                               "teacher_path": str(path.resolve()), "teacher_hub_id": ""})
        return Teacher(unet, ddpm, path, steps).to(device)
    raise UserError(f"{path} holds no student D, packed B or teacher; give a folder that '--mode train_d', "
                    f"'--mode binarize' or '--mode pretrain' wrote, or a diffusers teacher folder")
