"""Trajectory spaces (docs/design.md §2): where a record's chain runs, and everything that follows from that.

    pixel   the teacher's DDIM chain from x_T: the chain starts at x_T and ends at the image itself.
    latent  the RNet's ring: the chain starts at Rin(x_T, T - 1), takes R steps on the ring's grid, and the
            image is X0out of its end state (the RNet is part of the data's maker).

A manifest's generator block (``of_generator``) or the config (``of_config``, for ``generate``) names the space;
the stages ask this object rather than testing the name. Its two flags say what of a record follows from what
(the codec stores only the rest, D predicts only the rest); its methods sample the chain, read an end state out
as an image, give the chain's width and name the sampler in manifests and reports. A new space (say a VAE's
latent) is one class here with the same attributes, a line in SPACES and its tests.
"""


class PixelSpace:
    name = "pixel"
    # the chain starts at x_T exactly: its start codes follow from x_T (only the reference's format stores them)
    # and D has no start to predict
    start_is_x_T = True
    # the image is the chain's end state clamped to [-1, 1]: the codec keeps at most its small correction
    image_is_end = True
    needs_rnet = False
    step_name = "DDIM"

    @staticmethod
    def chain_channels(unet_config) -> int:
        """The channels of the chain's states for a teacher UNet of this config: the image's."""
        return unet_config["in_channels"]

    @staticmethod
    def sampler_text(generator: dict, steps: int) -> str:
        """The sampler in reports; imported data does not record its steps, so ``steps`` are then the config's."""
        return f"DDIM eta=0, {steps} steps" + (
            "" if generator["steps"] else " (the config's: the imported data does not record the teacher's steps)")

    @staticmethod
    def manifest_sampler(generator: dict) -> str:
        return "DDIM, eta=0 (diffusers DDIMScheduler)"

    @staticmethod
    def residual_sampler(unet, ddim_scheduler, rnet, steps: int):
        """x_T, chunks -> (start, residuals, end state, image) of the teacher's chain, as float32 tensors."""
        from .trajectory import pixel_residual_record

        def sample(x_T, chunks):
            start, residuals, end = pixel_residual_record(unet, ddim_scheduler, x_T, steps, chunks)
            return start, residuals, end, end
        return sample

    @staticmethod
    def image_sampler(unet, ddim_scheduler, rnet, steps: int):
        """x_T -> the images of the chain that made the data (clamped to [-1, 1])."""
        from .trajectory import ddim_sample
        return lambda x_T: ddim_sample(unet, ddim_scheduler, x_T, steps)

    @staticmethod
    def readout(student, end_state):
        """The image of a student's predicted end state: the state itself."""
        return end_state


class LatentSpace:
    name = "latent"
    start_is_x_T = False  # the start Rin(x_T) is stored as codes, and D predicts it beside the chunks
    image_is_end = False  # the image X0out(end, 0) is stored as it is
    needs_rnet = True
    step_name = "ring"

    @staticmethod
    def chain_channels(unet_config) -> int:
        """The ring's width for a teacher UNet of this config: its first block's channels (Rin's output)."""
        return unet_config["block_out_channels"][0]

    @staticmethod
    def sampler_text(generator: dict, steps: int) -> str:
        return f"ring of the RNet ({generator.get('rnet')}), {steps} R steps"

    @staticmethod
    def manifest_sampler(generator: dict) -> str:
        return f"ring of the RNet: Rin(x_T, {generator['T'] - 1}), {generator['steps']} R steps, X0out(z, 0)"

    @staticmethod
    def residual_sampler(unet, ddim_scheduler, rnet, steps: int):
        from . import ring
        grid = ring.ring_timesteps(rnet.T, steps)
        return lambda x_T, chunks: ring.latent_residual_record(rnet, x_T, grid, chunks)

    @staticmethod
    def image_sampler(unet, ddim_scheduler, rnet, steps: int):
        from . import ring
        grid = ring.ring_timesteps(rnet.T, steps)
        return lambda x_T: ring.ring_sample(rnet, x_T, grid)

    @staticmethod
    def readout(student, end_state):
        """The image of a student's predicted end state: its frozen copy of the RNet's x0 head at t = 0."""
        import torch
        return student.x0out(end_state, torch.zeros(len(end_state), dtype=torch.long, device=end_state.device))


SPACES = {space.name: space for space in (PixelSpace(), LatentSpace())}


def of_generator(generator: dict):
    """The space of the data a manifest's generator block describes (older manifests, all pixel, name none)."""
    return SPACES[generator.get("space") or "pixel"]


def of_config(cfg):
    """The space ``generate`` writes (the ``space`` key)."""
    return SPACES[cfg["space"]]


def of_reference_files(image_channels: int, chain_channels: int):
    """The space of records in the reference's layout, which names none: pixel where the chain has the image's
    channels, else the ring's latent."""
    return SPACES["pixel" if chain_channels == image_channels else "latent"]

