"""An RNet folder: its config and only the weights that differ from its teacher (docs/design.md §14).

``rnet_config.json`` holds the network's config (``RNet.config``), the teacher's sha256, the ring's
steps and the prediction type; ``rnet.safetensors`` holds every tensor except the frozen teacher
weights (fp32, with a sha256 of tensors and config in its metadata), so the shipped file is small and
is only ever combined with the teacher it was trained on: loading rebuilds the RNet around the
configured teacher, refuses another one, and checks that exactly the frozen teacher weights were left
out.
"""
from pathlib import Path

from safetensors.torch import save

from ..core import atomic, checksums, jsonfile
from ..core.errors import UserError
from .rnet import RNet

CONFIG_FILE, WEIGHTS_FILE, KIND = "rnet_config.json", "rnet.safetensors", "rnet"
REDO = "train it again with 'Main_Diffusion.py --mode rectify'"


def frozen_teacher_names(net: RNet) -> set:
    """State-dict names of the teacher weights that training never changes."""
    return {name for name, p in net.named_parameters() if not p.requires_grad}


def save_rnet(net: RNet, folder, teacher_sha256: str, steps: int, prediction: str) -> int:
    """Write the folder; returns the weights' byte size."""
    folder = Path(folder)
    frozen = frozen_teacher_names(net)
    state = {k: v.detach().float().cpu().contiguous() for k, v in net.state_dict().items() if k not in frozen}
    config = {"kind": KIND, "network": net.config, "teacher_sha256": teacher_sha256, "steps": steps,
              "prediction": prediction}
    data = save(state, metadata={"format": KIND, "sha256": checksums.content_sha256(state, config)})
    atomic.write_bytes(folder / WEIGHTS_FILE, data)
    atomic.write_json(folder / CONFIG_FILE, config)
    return len(data)


def read_config(folder) -> dict:
    config_path = Path(folder) / CONFIG_FILE
    if not config_path.is_file() or not (Path(folder) / WEIGHTS_FILE).is_file():
        raise UserError(f"{folder} holds no RNet (expected {CONFIG_FILE} and {WEIGHTS_FILE}); make one with "
                        f"'Main_Diffusion.py --mode rectify' or point rnet_path= at an RNet folder")
    try:
        config = jsonfile.loads(config_path.read_text())
    except (OSError, ValueError):
        config = None
    if not isinstance(config, dict) or config.get("kind") != KIND:
        raise UserError(f"{config_path} is not an RNet config; restore it or {REDO}")
    return config


def load_rnet(folder, teacher, teacher_sha256: str, steps: int = 0) -> tuple:
    """(RNet around ``teacher``, its config); refused when it was trained on another teacher or, with
    ``steps``, for another number of ring steps."""
    folder = Path(folder)
    config = read_config(folder)
    if config["teacher_sha256"] != teacher_sha256:
        raise UserError(f"the RNet in {folder} was trained on another teacher (sha256 {config['teacher_sha256'][:12]}"
                        f"... against {teacher_sha256[:12]}...); rectify this teacher or set teacher_path= to that one")
    if steps and config["steps"] != steps:
        raise UserError(f"the RNet in {folder} runs {config['steps']} ring steps, not the {steps} asked for; set "
                        f"steps={config['steps']} or rectify again with rect_steps={steps}")
    try:
        state, metadata, _ = checksums.read_safetensors(folder / WEIGHTS_FILE)
    except (OSError, ValueError) as err:
        raise UserError(f"{folder / WEIGHTS_FILE} cannot be read ({err}: truncated or damaged); restore it or "
                        f"{REDO}") from None
    checksums.verify_checksum(folder / WEIGHTS_FILE, metadata, checksums.content_sha256(state, config), REDO,
                             CONFIG_FILE)
    settings = {k: v for k, v in config["network"].items() if k != "teacher"}
    net = RNet(teacher, **settings)
    missing, unexpected = net.load_state_dict(state, strict=False)
    if unexpected or set(missing) != frozen_teacher_names(net):
        raise UserError(f"{folder / WEIGHTS_FILE} does not fit its RNet config and teacher; {REDO}")
    return net.eval(), config
