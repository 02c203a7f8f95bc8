"""A minimal kdplug plugin: a tiny MLP teacher and student, a distillation loss, a command."""
import click
import torch
import torch.nn.functional as F
from torch import nn

import kdplug
from kdplug.ops import kd_kl_div


def mlp(hidden: int, in_features: int = 784, num_classes: int = 10) -> nn.Module:
    """Flatten, one hidden layer, logits out."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))


def mlp_teacher(in_features: int = 784, num_classes: int = 10) -> nn.Module:
    return mlp(256, in_features, num_classes)


def mlp_student(in_features: int = 784, num_classes: int = 10) -> nn.Module:
    return mlp(32, in_features, num_classes)


def kd_loss(temperature: float = 4.0, alpha: float = 0.9):
    """alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)."""
    if temperature <= 0 or not 0 <= alpha <= 1:
        raise ValueError(f"need temperature > 0 and 0 <= alpha <= 1, "
                         f"got temperature={temperature}, alpha={alpha}")

    def loss(student_out, teacher_out, batch) -> torch.Tensor:
        # Outputs are kdplug.ModelOutput objects; the batch is a dict of tensors.
        soft = kd_kl_div(student_out.logits, teacher_out.logits, temperature)  # fused, T² included
        hard = F.cross_entropy(student_out.logits, batch["labels"])
        return alpha * soft + (1 - alpha) * hard

    return loss


@kdplug.hookimpl
def register_teachers(register):
    register("example-mlp-large", mlp_teacher, description="MLP, 256 hidden units")


@kdplug.hookimpl
def register_students(register):
    register("example-mlp-small", mlp_student, description="MLP, 32 hidden units")


@kdplug.hookimpl
def register_losses(register):
    register("example-kd", kd_loss, description="Hinton et al. 2015 soft + hard loss")


@kdplug.hookimpl
def register_commands(cli):
    @cli.command("example-sizes")
    @click.option("--in-features", type=int, default=784, show_default=True)
    @click.option("--num-classes", type=int, default=10, show_default=True)
    def example_sizes(in_features, num_classes):
        """Parameter counts of the example teacher and student."""
        for name, build in (("example-mlp-large", mlp_teacher), ("example-mlp-small", mlp_student)):
            params = sum(p.numel() for p in build(in_features, num_classes).parameters())
            click.echo(f"{name}: {params:,} parameters")
