"""chunked_loss: the emitted scripts' ChunkedTokenLogps / ChunkedOutputLayer against the plain output layer.

The class is extracted from the compiled sft script (the code users run). The independent reference is the
textbook computation in float64: logits = h W^T over every position, log_softmax, the target's entry, and
autograd's gradient of sum_t g_t log p_t for a random upstream gradient g (so the backward pass is checked
with weights other than the all-ones of a plain sum). Rows are ragged: -100 targets (prompt and padding)
are skipped, and chunk sizes from 1 token to more than all of them are tried.

Tolerances: float32 against float64, rel 1e-5 (values) and 1e-4 (gradients, summed over 100+ tokens); bf16
autocast against nn.Linear + F.cross_entropy(logits.float()) under the same autocast: values rel 2e-3 and
gradients rel 2e-2 (the plain path rounds the whole weight gradient to bf16 once, the chunked one sums the
chunks in float32).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import compile_script
from script_functions import load_functions

NAMES = ["ChunkedTokenLogps", "ChunkedOutputLayer", "autocast_dtype", "use_chunked_head", "chunked_output_layer"]


@pytest.fixture(scope="module", params=["dpo", "kto"])
def chunked(kb, request):
    from accelerate.utils import extract_model_from_parallel

    from ptcompile.runtime_args import PLAIN_HEAD_MODEL_TYPES

    functions = load_functions(compile_script(kb, request.param), NAMES)
    # The module-level names these functions read (the script imports / renders them the same way).
    namespace = functions["ChunkedOutputLayer"].__init__.__globals__
    namespace.update(PLAIN_HEAD_MODEL_TYPES=PLAIN_HEAD_MODEL_TYPES, extract_model_from_parallel=extract_model_from_parallel)
    return functions


def ragged(generator, rows=6, width=40, hidden=16, vocab=53):
    h = torch.randn(rows, width, hidden, generator=generator)
    weight = torch.randn(vocab, hidden, generator=generator) / hidden**0.5 * 3
    targets = torch.randint(0, vocab, (rows, width), generator=generator)
    for row in range(rows):
        length = int(torch.randint(5, width + 1, (1,), generator=generator))
        prompt = int(torch.randint(0, length - 1, (1,), generator=generator))
        targets[row, :prompt] = -100
        targets[row, length:] = -100
    return h, weight, targets


def reference(h, weight, targets, upstream):
    """float64 log p(target) at trained positions and the gradients of sum(upstream * log p)."""
    h64 = h.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    trained = targets != -100
    logps = torch.log_softmax(h64 @ w64.T, dim=-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)[trained]
    (logps * upstream.double()).sum().backward()
    return logps.detach(), h64.grad, w64.grad


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_values_and_gradients_equal_the_float64_formula(chunked, chunk):
    generator = torch.Generator().manual_seed(chunk)
    h, weight, targets = ragged(generator)
    head = chunked["ChunkedOutputLayer"](torch.nn.Linear(weight.size(1), weight.size(0), bias=False), chunk)
    head.weight.data.copy_(weight)
    leaf = h.clone().requires_grad_()
    hidden = head(leaf)  # the pass-through forward, as inside the model
    assert torch.equal(hidden, h)
    logps, rows = head.token_logps(hidden, targets)
    upstream = torch.randn(logps.shape, generator=generator)
    (logps * upstream).sum().backward()
    expected, grad_h, grad_w = reference(h, weight, targets, upstream)
    assert torch.equal(rows, (targets != -100).nonzero()[:, 0])
    torch.testing.assert_close(logps.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(leaf.grad.double(), grad_h, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(head.weight.grad.double(), grad_w, rtol=1e-4, atol=1e-6)


def test_untrained_positions_get_no_gradient_and_a_frozen_weight_none(chunked):
    generator = torch.Generator().manual_seed(1)
    h, weight, targets = ragged(generator)
    head = chunked["ChunkedOutputLayer"](torch.nn.Linear(weight.size(1), weight.size(0), bias=False), 5)
    head.weight.data.copy_(weight)
    head.weight.requires_grad_(False)  # PEFT: the output layer is frozen
    leaf = h.clone().requires_grad_()
    logps, _ = head.token_logps(head(leaf), targets)
    logps.sum().backward()
    assert leaf.grad[targets == -100].abs().max() == 0  # prompt and padding positions never meet the head
    assert leaf.grad[targets != -100].abs().min() > 0
    assert head.weight.grad is None


def test_bf16_autocast_matches_the_plain_output_layer_under_autocast(chunked):
    generator = torch.Generator().manual_seed(2)
    h, weight, targets = ragged(generator, rows=4, width=64, hidden=32, vocab=97)
    linear = torch.nn.Linear(32, 97, bias=False)
    linear.weight.data.copy_(weight)
    plain_h = h.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = linear(plain_h)
    plain = -F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none", ignore_index=-100)[targets != -100]
    upstream = torch.randn(plain.shape, generator=generator)
    (plain * upstream).sum().backward()

    head = chunked["ChunkedOutputLayer"](torch.nn.Linear(32, 97, bias=False), 9)
    head.weight.data.copy_(weight)
    leaf = h.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = head(leaf)
    assert head.matmul_dtype == torch.bfloat16  # recorded inside the forward pass, used by the loss outside it
    logps, _ = head.token_logps(hidden, targets)
    (logps * upstream).sum().backward()
    torch.testing.assert_close(logps, plain.detach(), rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(head.weight.grad, linear.weight.grad, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(leaf.grad, plain_h.grad, rtol=2e-2, atol=2e-2)


def tiny_llama(tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("tie", [True, False])
def test_a_swapped_model_gives_the_plain_models_loss_gradients_and_saved_weights(chunked, tie, tmp_path):
    """Through a real transformers model (tied embeddings included): same loss and gradients on every
    parameter, and save_pretrained writes a checkpoint that loads as an ordinary model."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    plain, swapped = tiny_llama(tie), tiny_llama(tie)
    notes = []
    chunked["use_chunked_head"](swapped, SimpleNamespace(chunked_loss=True, loss_chunk_size=8), notes.append)
    assert chunked["chunked_output_layer"](swapped) is not None and not notes
    assert (swapped.get_output_embeddings().weight is swapped.get_input_embeddings().weight) == tie
    ids = torch.randint(0, 61, (3, 20), generator=torch.Generator().manual_seed(3))
    targets = ids[:, 1:].clone()
    targets[0, :6] = -100

    logits = plain(input_ids=ids).logits[:, :-1]
    plain_loss = F.cross_entropy(logits.transpose(1, 2), targets, reduction="sum", ignore_index=-100)
    plain_loss.backward()
    logps, _ = swapped.get_output_embeddings().token_logps(swapped(input_ids=ids).logits[:, :-1], targets)
    (-logps.sum()).backward()
    torch.testing.assert_close(-logps.sum(), plain_loss, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(plain.named_parameters(), swapped.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)

    swapped.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert isinstance(reloaded.get_output_embeddings(), torch.nn.Linear)
    torch.testing.assert_close(reloaded(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_other_heads_keep_the_plain_path_and_say_so(chunked):
    from types import SimpleNamespace

    from transformers import Gemma2Config, Gemma2ForCausalLM

    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    notes = []
    chunked["use_chunked_head"](model, SimpleNamespace(chunked_loss=True, loss_chunk_size=8), notes.append)
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear) and chunked["chunked_output_layer"](model) is None
    assert notes and "gemma2" in notes[0]
    llama = tiny_llama(False)
    chunked["use_chunked_head"](llama, SimpleNamespace(chunked_loss=False, loss_chunk_size=8), notes.append)
    assert chunked["chunked_output_layer"](llama) is None
    with pytest.raises(SystemExit, match="loss_chunk_size"):
        chunked["use_chunked_head"](llama, SimpleNamespace(chunked_loss=True, loss_chunk_size=0), notes.append)


@pytest.fixture(scope="module")
def sft_head(kb):
    """The sft script's ChunkedOutputLayer, whose summed_nll (ChunkedSummedNLL) forms the SFT loss."""
    functions = load_functions(compile_script(kb, "sft"), ["ChunkedOutputLayer", "ChunkedSummedNLL", "autocast_dtype"])
    return functions["ChunkedOutputLayer"]


@pytest.mark.parametrize("chunk", [1, 7, 10_000])
@pytest.mark.parametrize("frozen", [False, True])
def test_summed_nll_and_its_precomputed_gradient_equal_the_float64_formula(sft_head, chunk, frozen):
    """The SFT sum -sum_t log p(y_t), its gradient built in the forward pass and scaled by the upstream
    scalar in the backward pass (here 0.37, as the loop's 1/N scaling would), against float64 autograd."""
    generator = torch.Generator().manual_seed(10 + chunk)
    h, weight, targets = ragged(generator)
    head = sft_head(torch.nn.Linear(weight.size(1), weight.size(0), bias=False), chunk)
    head.weight.data.copy_(weight)
    head.weight.requires_grad_(not frozen)
    leaf = h.clone().requires_grad_()
    loss = head.summed_nll(head(leaf), targets)
    (0.37 * loss).backward()
    logps, grad_h, grad_w = reference(h, weight, targets, torch.full(((targets != -100).sum(),), -0.37))
    torch.testing.assert_close(loss.double(), -logps.sum(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(leaf.grad.double(), grad_h, rtol=1e-4, atol=1e-6)
    assert leaf.grad[targets == -100].abs().max() == 0
    if frozen:
        assert head.weight.grad is None
    else:
        torch.testing.assert_close(head.weight.grad.double(), grad_w, rtol=1e-4, atol=1e-6)


def test_summed_nll_under_bf16_autocast_matches_the_plain_cross_entropy(sft_head):
    generator = torch.Generator().manual_seed(4)
    h, weight, targets = ragged(generator, rows=4, width=64, hidden=32, vocab=97)
    linear = torch.nn.Linear(32, 97, bias=False)
    linear.weight.data.copy_(weight)
    plain_h = h.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = linear(plain_h)
    plain = F.cross_entropy(logits.float().reshape(-1, 97), targets.reshape(-1), ignore_index=-100, reduction="sum")
    plain.backward()
    head = sft_head(torch.nn.Linear(32, 97, bias=False), 9)
    head.weight.data.copy_(weight)
    leaf = h.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = head(leaf)
    loss = head.summed_nll(hidden, targets)
    loss.backward()
    torch.testing.assert_close(loss, plain.detach(), rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(head.weight.grad, linear.weight.grad, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(leaf.grad, plain_h.grad, rtol=2e-2, atol=2e-2)
