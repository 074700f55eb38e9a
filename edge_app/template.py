"""The model's chat template, rendered on the edge (the cloud only ever sees token ids)."""
from __future__ import annotations

from functools import lru_cache

from sampling import common_prefix_len

# Used when a GGUF carries no template of its own: ChatML, which Qwen and many others speak.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@lru_cache(maxsize=8)
def _compile(source: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # templates come from model files

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str):
        raise ValueError(f"chat template: {message}")

    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def chat_ids(messages: list[dict], template: str | None, tokenize) -> list[int]:
    """messages -> the prompt's ids: rendered with `template`, then tokenize(text, add_bos) with a
    BOS only when the rendered text does not open with a tag of its own."""
    text = render_chat(messages, template)
    return tokenize(text, add_bos=not text.startswith("<"))


def opening_len(messages: list[dict], ids: list[int], template: str | None, tokenize) -> int:
    """How many of a conversation's prompt ids (`ids`, from chat_ids) every conversation with the
    same system turn opens with: the template's header and the system messages, up to where the
    first user turn's own text starts. Found by rendering two probe conversations that differ only
    in that text: whatever the template, their common ids are the shared opening."""
    system = []
    for m in messages:
        if m.get("role") != "system":
            break
        system.append(m)
    probes = [chat_ids(system + [{"role": "user", "content": text}], template, tokenize) for text in ("0", "1")]
    return min(common_prefix_len(*probes), common_prefix_len(probes[0], ids))


def render_chat(messages: list[dict], template: str | None = None, bos_token: str = "",
                eos_token: str = "", add_generation_prompt: bool = True) -> str:
    """messages: [{"role": "system"|"user"|"assistant", "content": str}] -> the prompt text."""
    return _compile(template or CHATML).render(
        messages=messages, add_generation_prompt=add_generation_prompt,
        bos_token=bos_token, eos_token=eos_token, tools=None,
    )
