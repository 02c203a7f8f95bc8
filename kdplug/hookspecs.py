"""The plugin contract: every hook a kdplug plugin may implement.

A plugin is a module (or any object) with functions marked ``@kdplug.hookimpl`` whose names are
hook names below. Built-in plugins and third-party plugins use the same contract and are found the
same way: entry points of the group ``kdplug``.

Every hook here collects from all plugins: each implementation runs once, in pluggy's order, and its
return value is ignored. Implementations hand their providers to the ``register`` callback instead,
so kdplug can validate them, refuse duplicate names (naming both plugins) and remember which plugin
gave what::

    register(name: str, factory: Callable, **info) -> None

``name`` is unique per kind across all plugins; ``info`` is free-form metadata kept with the entry
(``description="..."`` is shown by ``kdplug plugins``).

``register_commands(cli)`` is the one hook of another shape: it adds subcommands to the ``kdplug``
command line.
"""
from __future__ import annotations

import pluggy

PROJECT_NAME = "kdplug"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
#: The marker plugins put on their hook functions; re-exported as ``kdplug.hookimpl``.
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def register_teachers(register):
    """Register teacher model factories. All implementations are called; return values ignored.

    Call ``register(name, factory, **info)`` once per teacher. ``factory(**options)`` must return a
    ``torch.nn.Module`` whose ``forward`` returns the logits tensor ``[..., num_classes]``, or an
    object with a ``.logits`` attribute (and, when asked through an option, intermediate features).
    ``kdplug.create_teacher(name, **options)`` calls it.
    """


@hookspec
def register_students(register):
    """Register student model factories. All implementations are called; return values ignored.

    Call ``register(name, factory, **info)`` once per student. Same contract as a teacher:
    ``factory(**options)`` returns a ``torch.nn.Module`` whose ``forward`` returns logits, or an
    object with ``.logits``. ``kdplug.create_student(name, **options)`` calls it.
    """


@hookspec
def register_losses(register):
    """Register distillation loss factories. All implementations are called; return values ignored.

    Call ``register(name, factory, **info)`` once per loss. ``factory(**options)`` (e.g.
    ``temperature=4.0, alpha=0.9``) must return a callable
    ``loss(student_out, teacher_out, batch) -> scalar torch.Tensor``. The outputs are
    ``kdplug.ModelOutput`` objects (``.logits``, and ``.hidden_states`` / ``.attentions`` when the
    loss has ``requires = {"hidden_states", ...}``); ``batch`` is a dict with ``"inputs"``,
    ``"labels"`` and, for padded tokens, ``"attention_mask"``. The engine passes its
    ``temperature=`` and ``alpha=`` when the factory accepts them. A loss that is an
    ``nn.Module`` with parameters (e.g. a learned projection) is trained with the student and saved
    in its checkpoints. A loss with a ``set_epoch(epoch)`` method is told the 0-based epoch at the
    start of every training epoch (and before the dry run: 0), e.g. for DKD's warm-up. A loss
    holding ``kdplug.feature_source.FeatureSource`` objects with module paths gets forward hooks on
    the run's student and teacher for its features, removed when the run ends.
    ``kdplug.create_loss(name, **options)`` calls it.
    """


@hookspec
def register_datasets(register):
    """Register data providers. All implementations are called; return values ignored.

    Call ``register(name, factory, **info)`` once per data set. ``factory(**options)`` must return a
    ``kdplug.data.DataSplits``: the ``train`` and ``test`` map-style ``torch.utils.data.Dataset``
    splits plus what the models must agree on (``num_classes``, ``input_shape`` and, for token data,
    ``vocab_size``), so a mismatched teacher or student is caught before training.
    ``kdplug.create_dataset(name, **options)`` calls it.
    """


@hookspec
def register_commands(cli):
    """Add subcommands to the ``kdplug`` command line. All implementations are called; return
    values ignored.

    ``cli`` is a ``click.Group``: define commands with ``@cli.command()`` (or
    ``cli.add_command(...)``, or a ``@cli.group()`` of several). They become ``kdplug NAME``, with
    ``--help`` and kdplug's ``Error: …`` messages; a name that kdplug or another plugin already
    uses is an error naming both. Keep a command a thin layer over Python functions, as kdplug's
    own are. ``kdplug plugins`` lists the commands each plugin adds.
    """
