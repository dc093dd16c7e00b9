"""The monitor dropped into a trainer written like diffusers' ``train_unconditional.py``: a Hugging
Face ``datasets.Dataset`` with a transform that flips at random and returns ``{"input": ...}``,
``checkpoint-<step>`` folders pruned by the script's own ``checkpoints_total_limit``, an EMA
registered for checkpointing after the monitor, resuming from the latest checkpoint, a first run
that had no monitor at all. The lines the monitor adds are marked ``# IRS:``."""

import inspect
import logging
import os
import shutil

import pytest
import torch

datasets = pytest.importorskip("datasets")

from monitor_helpers import digits, pixels, tiny_unet  # noqa: E402

CHECKPOINTING_STEPS, TOTAL_LIMIT = 4, 2


def digits_dataset():
    """sklearn digits as a Hugging Face dataset of PIL images, with the script's transform."""
    from PIL import Image
    from torchvision import transforms

    x, _ = digits()
    images = [Image.fromarray((x[i, 0].numpy() * 255).astype("uint8"), mode="L") for i in range(300)]
    dataset = datasets.Dataset.from_dict({"image": images})
    augmentations = transforms.Compose([transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                                        transforms.Normalize([0.5], [0.5])])

    def transform_images(examples):
        return {"input": [augmentations(image.convert("L")) for image in examples["image"]]}

    dataset.set_transform(transform_images)
    return dataset


def train(output_dir, max_steps, *, use_monitor=True, resume="latest", seed=0):
    """A condensed train_unconditional.py; returns (losses, monitor)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler
    from diffusers.training_utils import EMAModel

    from irs_callbacks import IRSMonitor, PipelineSampler, ReferenceConfig  # IRS:

    os.makedirs(output_dir, exist_ok=True)
    accelerator = Accelerator(cpu=True, project_config=ProjectConfiguration(
        project_dir=str(output_dir), logging_dir=str(output_dir / "logs")))
    set_seed(seed)
    dataset = digits_dataset()
    train_dataloader = torch.utils.data.DataLoader(dataset, batch_size=16, shuffle=True)
    model = tiny_unet(seed)
    noise_scheduler = DDPMScheduler(num_train_timesteps=100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer, train_dataloader = accelerator.prepare(model, optimizer, train_dataloader)
    pipeline = DDIMPipeline(unet=accelerator.unwrap_model(model), scheduler=DDIMScheduler(num_train_timesteps=100))
    if use_monitor:
        monitor = IRSMonitor(PipelineSampler(pipeline, num_inference_steps=2), reference=ReferenceConfig(extractor=pixels, progress=False), num_samples=60, batch_size=30, pruner="rejected")  # IRS: # noqa: E501
        monitor.attach(accelerator, train_dataloader)  # IRS:
    ema_model = EMAModel(model.parameters(), decay=0.9)
    accelerator.register_for_checkpointing(ema_model)  # registered after the monitor

    global_step = 0
    dirs = sorted((d for d in os.listdir(output_dir) if d.startswith("checkpoint")), key=lambda d: int(d.split("-")[1])) \
        if resume and os.path.isdir(output_dir) else []
    if dirs:
        accelerator.load_state(os.path.join(output_dir, dirs[-1]))
        global_step = int(dirs[-1].split("-")[1])
    losses = []
    while global_step < max_steps:
        for batch in train_dataloader:
            clean_images = batch["input"]
            noise = torch.randn(clean_images.shape)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (clean_images.shape[0],))
            noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
            loss = torch.nn.functional.mse_loss(model(noisy_images, timesteps).sample, noise)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            ema_model.step(model.parameters())
            global_step += 1
            losses.append(loss.item())
            if global_step % CHECKPOINTING_STEPS == 0:
                checkpoints = sorted((d for d in os.listdir(output_dir) if d.startswith("checkpoint")),
                                     key=lambda d: int(d.split("-")[1]))
                for removing in checkpoints[: max(0, len(checkpoints) - TOTAL_LIMIT + 1)]:
                    shutil.rmtree(os.path.join(output_dir, removing))  # checkpoints_total_limit
                accelerator.save_state(os.path.join(output_dir, f"checkpoint-{global_step}"))
            if use_monitor and monitor.step(global_step):  # IRS:
                break  # IRS:
            if global_step >= max_steps:
                break
    if use_monitor:
        monitor.close()  # IRS:
    return losses, monitor if use_monitor else None


def test_the_monitor_adds_at_most_six_lines():
    source = inspect.getsource(train)
    assert 1 <= sum("# IRS:" in line for line in source.splitlines()) <= 6


def test_training_is_bit_identical_with_and_without_the_monitor(tmp_path):
    """Set-up (an uncached bank built through the flipping transform) and evaluations consume
    none of the trainer's random streams."""
    plain, _ = train(tmp_path / "plain", 9, use_monitor=False)
    watched, monitor = train(tmp_path / "watched", 9)
    assert [r.step for r in monitor.history] == [4, 8]
    assert watched == plain


def test_drop_in_with_a_first_run_without_monitor_resume_and_total_limit(tmp_path, caplog):
    out = tmp_path / "run"
    train(out, 8, use_monitor=False)  # the run existed before the monitor was added
    with caplog.at_level(logging.INFO, logger="irs_callbacks"):
        _, monitor = train(out, 20)  # resumes from checkpoint-8, which holds no monitor state
    text = caplog.text
    assert "holds no monitor state" in text and "augmented" in text
    assert [r.step for r in monitor.history] == [12, 16, 20]  # dict items {"input": ...} were read
    assert sum(line.startswith("IRSMonitor step") for line in caplog.messages) == 3  # one line each
    ledger = (out / "irs_pruning_ledger.json").read_text()
    import json

    entries = json.loads(ledger)["checkpoints"]
    deleted_by_script = [name for name, e in entries.items() if e["status"] == "missing"]
    assert deleted_by_script, entries  # the script's checkpoints_total_limit, recorded as such
    assert "deleted outside the monitor" in text
    caches = list((out / "logs" / "reference_cache").glob("reference-*.safetensors"))
    _, again = train(out, 24)  # the same augmented data: the bank cache is hit, not rebuilt
    assert list((out / "logs" / "reference_cache").glob("reference-*.safetensors")) == caches and len(caches) == 1
    assert [r.step for r in again.history] == [12, 16, 20, 24]
