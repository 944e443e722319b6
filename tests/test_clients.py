"""Third-party clients, run unchanged on our model: transformers' Trainer, PEFT (LoRA with
task_type="CAUSAL_LM"), transformers' text-generation pipeline and lm-eval's HFLM. Each test runs
the client once on our model and once on transformers' LlamaForCausalLM loaded from the same folder
(a tiny random checkpoint with a word-level tokenizer and a chat template), fp32 on CPU, and asserts
the same numbers: losses, gradients, logits, tokens, text, metrics.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ATOL, IDS, hf_load, make_hf_model, report_max_diff, tiny_config_dict, write_tiny_tokenizer

import llama_port

# The whole module needs every client; a missing one skips it, nothing else does.
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers.Trainer needs it
datasets = pytest.importorskip("datasets")
peft = pytest.importorskip("peft")
lm_eval = pytest.importorskip("lm_eval")
from lm_eval.models.huggingface import HFLM  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# A chat template in the tiny tokenizer's words (w3 = user turn, w4 = assistant turn).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}w3 {% else %}w4 {% endif %}{{ message['content'] }} "
    "{% endfor %}"
    "{% if add_generation_prompt %}w4 {% endif %}"
)
PROMPT = "w5 w17 w99 w3 w64"
MESSAGES = [
    {"role": "user", "content": "w5 w17 w99"},
    {"role": "assistant", "content": "w8 w42"},
    {"role": "user", "content": "w11 w120"},
]


def load_ours(folder: Path):
    """The model under test: ours, as a user loads it."""
    return llama_port.LlamaForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()


def load_theirs(folder: Path):
    return hf_load(folder)


def load_tokenizer(folder: Path):
    return transformers.AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A tiny random Hub-format checkpoint (safetensors, config and generation_config as transformers
    writes them) with a word-level tokenizer that has a pad token and a chat template."""
    root = tmp_path_factory.mktemp("client_model")
    make_hf_model(tiny_config_dict(), seed=3).save_pretrained(root)
    write_tiny_tokenizer(root)
    tok = load_tokenizer(root)
    tok.pad_token = "<unk>"  # id 0, the config's pad_token_id
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(root))
    return root


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item()


# ------------------------------------------------------------------------- transformers Trainer
def train_dataset():
    """12 rows of 8 tokens; rows differ in how many label positions are -100 (prompt masking and
    right padding), so the number of items in a batch differs between accumulated micro-batches and
    the Trainer's num_items_in_batch normalisation changes the loss."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (12, 8), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    for row in range(12):
        labels[row, : row % 4] = -100  # a masked prompt of 0..3 tokens
        pad = (row * 5) % 3  # 0..2 right-padding tokens
        if pad:
            ids[row, -pad:], mask[row, -pad:], labels[row, -pad:] = 0, 0, -100
    columns = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return datasets.Dataset.from_dict({name: column.tolist() for name, column in columns.items()})


def train(model, output_dir: Path):
    args = transformers.TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=3,
        learning_rate=0.05,
        optim="sgd",  # linear in the gradient: Adam's first step, lr * sign(grad), would amplify 1e-9 gradients
        lr_scheduler_type="constant",
        max_grad_norm=0.0,  # no clipping: it would rescale away a wrong loss normalisation
        seed=0,
        data_seed=0,
        dataloader_drop_last=True,
        dataloader_num_workers=0,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=train_dataset())
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, trainer.model


def test_trainer_losses_match_transformers(folder, tmp_path):
    our_losses, ours = train(load_ours(folder), tmp_path / "ours")
    their_losses, theirs = train(load_theirs(folder), tmp_path / "theirs")
    assert len(their_losses) == 3 and len(our_losses) == 3
    diff = max(abs(a - b) for a, b in zip(our_losses, their_losses))
    theirs_state = theirs.state_dict()
    weight_diff = max(max_abs(p, theirs_state[n]) for n, p in ours.state_dict().items())
    report_max_diff("Trainer per-step loss", diff)
    report_max_diff("Trainer weights after 3 steps", weight_diff)
    assert diff <= ATOL, (our_losses, their_losses)
    assert weight_diff <= ATOL


# ---------------------------------------------------------------------------------------- PEFT
def lora_config(init: bool | str = False):
    # init_lora_weights=False: B random too, so every LoRA matrix has a non-zero gradient.
    return peft.LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        init_lora_weights=init,
        task_type="CAUSAL_LM",
    )


def lora_params(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def adapter_dir(folder, tmp_path_factory) -> Path:
    """A LoRA adapter trained (3 SGD steps) and saved on transformers' model."""
    torch.manual_seed(1)
    model = peft.get_peft_model(load_theirs(folder), lora_config())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(str(out))
    return out


def test_peft_lora_gradients_match_transformers(folder):
    torch.manual_seed(0)
    ours = peft.get_peft_model(load_ours(folder), lora_config())
    torch.manual_seed(0)
    theirs = peft.get_peft_model(load_theirs(folder), lora_config())
    assert isinstance(ours, peft.PeftModelForCausalLM)
    ours_lora, theirs_lora = lora_params(ours), lora_params(theirs)
    assert sorted(ours_lora) == sorted(theirs_lora) and len(ours_lora) == 2 * 7 * 2
    with torch.no_grad():  # the same LoRA weights, whatever order they were drawn in
        for name, param in ours_lora.items():
            param.copy_(theirs_lora[name])

    mask = torch.ones_like(IDS)
    mask[1, :2] = 0  # a left-padded row
    losses = []
    for model in (ours, theirs):
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        first = model(input_ids=IDS, attention_mask=mask, labels=IDS)
        first.loss.backward()
        grads = {n: p.grad.clone() for n, p in lora_params(model).items()}
        opt.step()
        with torch.no_grad():
            second = model(input_ids=IDS, attention_mask=mask, labels=IDS).loss
        losses.append((first.loss.item(), second.item(), grads, first.logits))
    (o1, o2, og, ol), (t1, t2, tg, tl) = losses
    grad_diff = max(max_abs(og[n], tg[n]) for n in tg)
    assert min(g.abs().max().item() for g in tg.values()) > 0  # every LoRA matrix is exercised
    report_max_diff("PEFT LoRA gradients", grad_diff)
    report_max_diff("PEFT loss before/after one SGD step", max(abs(o1 - t1), abs(o2 - t2)))
    assert grad_diff <= ATOL
    assert abs(o1 - t1) <= ATOL and abs(o2 - t2) <= ATOL
    assert max_abs(ol, tl) <= ATOL


def test_peft_adapter_from_transformers_loads_on_ours(folder, adapter_dir):
    ours = peft.PeftModel.from_pretrained(load_ours(folder), str(adapter_dir)).eval()
    theirs = peft.PeftModel.from_pretrained(load_theirs(folder), str(adapter_dir)).eval()
    assert isinstance(ours, peft.PeftModelForCausalLM)
    with torch.no_grad():
        diff = max_abs(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits)
        base = load_theirs(folder)
        assert max_abs(theirs(input_ids=IDS).logits, base(input_ids=IDS).logits) > 1e-2  # the adapter matters
    report_max_diff("PEFT adapter logits", diff)
    assert diff <= ATOL

    prompt = IDS[:, :5]
    greedy = dict(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
    ours_tokens, theirs_tokens = ours.generate(**greedy), theirs.generate(**greedy)
    assert theirs_tokens.shape[1] > prompt.shape[1]
    assert ours_tokens.tolist() == theirs_tokens.tolist()


def test_peft_merge_and_unload_saves_for_transformers(folder, adapter_dir, tmp_path):
    merged = peft.PeftModel.from_pretrained(load_ours(folder), str(adapter_dir)).merge_and_unload()
    assert type(merged) is type(load_ours(folder))  # our class back, no LoRA layers left
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    merged.save_pretrained(tmp_path / "merged")
    reloaded = hf_load(tmp_path / "merged")
    theirs = peft.PeftModel.from_pretrained(load_theirs(folder), str(adapter_dir)).merge_and_unload()
    with torch.no_grad():
        expected = theirs(input_ids=IDS).logits
        ours_diff = max_abs(merged(input_ids=IDS).logits, expected)
        reloaded_logits = reloaded(input_ids=IDS).logits
    report_max_diff("PEFT merged, ours vs transformers", ours_diff)
    report_max_diff("PEFT merged, saved by us and read by transformers", max_abs(reloaded_logits, expected))
    assert ours_diff <= ATOL
    assert torch.equal(reloaded_logits, expected)  # the same merged weights, run by transformers


# -------------------------------------------------------------------- text-generation pipeline
def pipeline_text(model, tok, prompt, **kwargs):
    pipe = transformers.pipeline("text-generation", model=model, tokenizer=tok)
    out = pipe(prompt, max_new_tokens=12, do_sample=False, **kwargs)
    return out[0]["generated_text"]


@pytest.mark.parametrize("penalty", [None, 1.8], ids=["greedy", "repetition_penalty"])
@pytest.mark.parametrize("kind", ["plain", "chat"])
def test_pipeline_text_generation_matches_transformers(folder, kind, penalty):
    tok = load_tokenizer(folder)
    prompt = PROMPT if kind == "plain" else MESSAGES
    kwargs = {} if penalty is None else {"repetition_penalty": penalty}
    theirs = pipeline_text(load_theirs(folder), tok, prompt, **kwargs)
    ours = pipeline_text(load_ours(folder), tok, prompt, **kwargs)
    if kind == "chat":
        assert isinstance(theirs, list) and theirs[-1]["role"] == "assistant" and theirs[-1]["content"]
    else:
        assert isinstance(theirs, str) and len(theirs) > len(PROMPT)
    if penalty is not None:  # the penalty changes transformers' text, so matching it means ours applied it
        assert pipeline_text(load_theirs(folder), tok, prompt) != theirs
    print(f"[pipeline {kind} {penalty}] ours {ours!r}, transformers {theirs!r}")
    assert ours == theirs


# ------------------------------------------------------------------------------------- lm-eval
MC_DOCS = [
    {"question": "w5 w6 w7", "choices": ["w10", "w11 w12", "w13"], "answer": 1},
    {"question": "w20 w21", "choices": ["w30 w31", "w32", "w33 w34 w35"], "answer": 0},
    {"question": "w40 w41 w42 w43", "choices": ["w50", "w51", "w52"], "answer": 2},
    {"question": "w60", "choices": ["w70 w71", "w72 w73"], "answer": 1},
    {"question": "w80 w81 w82", "choices": ["w90", "w91 w92", "w93", "w94"], "answer": 3},
]
GEN_DOCS = [
    {"question": "w5 w17 w99", "answer": "w8"},
    {"question": "w20 w21 w22 w23", "answer": "w9"},
    {"question": "w40", "answer": "w41"},
    {"question": "w60 w61 w62", "answer": "w63"},
]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """Two lm-eval tasks defined here: tiny_mc (multiple_choice: acc, acc_norm) and tiny_gen
    (generate_until with a stop string: exact_match), on local JSON files."""
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    for name, docs in (("mc", MC_DOCS), ("gen", GEN_DOCS)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = "dataset_path: json\ntest_split: test\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
    (root / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n"
        + common
        + f"dataset_kwargs:\n  data_files:\n    test: {root / 'mc.jsonl'}\n"
        + "output_type: multiple_choice\n"
        + "doc_to_choice: '{{choices}}'\n"
        + "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    (root / "tiny_gen.yaml").write_text(
        "task: tiny_gen\n"
        + common
        + f"dataset_kwargs:\n  data_files:\n    test: {root / 'gen.jsonl'}\n"
        + "output_type: generate_until\n"
        + "generation_kwargs:\n  until: ['w74', 'w80']\n  max_gen_toks: 6\n  do_sample: false\n"
        + "metric_list:\n  - metric: exact_match\n"
    )
    return root


def evaluate(model, tok, task_dir: Path, task: str) -> dict:
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=2)
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=[task],
        # include_defaults=False: indexing lm-eval's thousands of built-in tasks takes 4 s a call.
        task_manager=lm_eval.tasks.TaskManager(include_path=str(task_dir), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
    )


def metrics(results: dict, task: str) -> dict:
    return {k: v for k, v in results["results"][task].items() if "," in k}


def test_lm_eval_multiple_choice_matches_transformers(folder, task_dir):
    tok = load_tokenizer(folder)
    theirs = evaluate(load_theirs(folder), tok, task_dir, "tiny_mc")
    ours = evaluate(load_ours(folder), tok, task_dir, "tiny_mc")
    assert {"acc,none", "acc_norm,none"} <= set(metrics(theirs, "tiny_mc"))
    assert metrics(ours, "tiny_mc") == metrics(theirs, "tiny_mc")

    # Beneath the metrics: every choice's log-likelihood and greedy flag.
    ll_diff = 0.0
    for o, t in zip(ours["samples"]["tiny_mc"], theirs["samples"]["tiny_mc"], strict=True):
        for (o_ll, o_greedy), (t_ll, t_greedy) in zip(
            (r[0] for r in o["resps"]), (r[0] for r in t["resps"]), strict=True
        ):
            ll_diff = max(ll_diff, abs(o_ll - t_ll))
            assert o_greedy == t_greedy
    report_max_diff("lm-eval multiple-choice log-likelihoods", ll_diff)
    assert ll_diff <= 1e-4  # a sum of a few fp32 log-probs


def test_lm_eval_generate_until_matches_transformers(folder, task_dir):
    tok = load_tokenizer(folder)
    theirs = evaluate(load_theirs(folder), tok, task_dir, "tiny_gen")
    ours = evaluate(load_ours(folder), tok, task_dir, "tiny_gen")
    assert "exact_match,none" in metrics(theirs, "tiny_gen")
    assert metrics(ours, "tiny_gen") == metrics(theirs, "tiny_gen")
    # Beneath the metric: every generated string (batched, left-padded, cut at the stop string).
    their_texts = [s["resps"] for s in theirs["samples"]["tiny_gen"]]
    our_texts = [s["resps"] for s in ours["samples"]["tiny_gen"]]
    assert any(text[0][0].strip() for text in their_texts)  # transformers generated something
    differing = sum(o != t for o, t in zip(our_texts, their_texts))
    print(f"[lm-eval generate_until] {differing} of {len(their_texts)} texts differ")
    assert our_texts == their_texts
