"""The slots of a step's grad call and the single pass's other rows: fixed widths, every position once."""

import copy

import pytest
import torch

from tokentune_peft.slots import Slots, other_positions, with_stand_ins

from helpers import assert_same_grads, build_model, make_batch, wrap
from naive_reference import naive_tokentune_loss


def test_slots_and_other_positions_cover_every_position_once():
    selected = torch.tensor([[0, 5, 7, -1], [1, 2, 3, 4], [6, -1, -1, -1]])
    real = torch.tensor([[1] * 8, [1] * 8, [0, 0, 1, 1, 1, 1, 1, 1]])
    slots = with_stand_ins(selected, 8, real)
    rest = other_positions(slots, 8)
    assert rest.shape == (3, 4)
    for row in range(3):
        assert sorted(slots[row].tolist() + rest[row].tolist()) == list(range(8))
    assert torch.equal(slots[selected >= 0], selected[selected >= 0])


def test_stand_ins_take_padding_first_then_unselected_tokens_in_order():
    selected = torch.tensor([[3, -1, -1, -1]])
    real = torch.tensor([[1, 1, 1, 1, 1, 0]])  # one padding token, at 5
    assert with_stand_ins(selected, 6, real).tolist() == [[3, 5, 0, 1]]
    assert with_stand_ins(selected, 6, None).tolist() == [[3, 0, 1, 2]]


def test_stand_in_values_carry_no_gradient():
    slots = Slots(torch.tensor([[1, -1]]), 3, torch.tensor([[1, 1, 0]]))
    own = torch.ones(1, 2, 4, requires_grad=True)
    full = torch.zeros(1, 3, 4)
    slots.write(full, own, lambda: own.detach() * 5)
    assert full[0, :, 0].tolist() == [0.0, 1.0, 5.0]
    full.sum().backward()
    assert own.grad[0, :, 0].tolist() == [1.0, 0.0]


@pytest.mark.parametrize("engine", ["single-pass", "two-pass"])
@pytest.mark.parametrize(
    "arch,task", [("llama", "CAUSAL_LM"), ("gpt2", "SEQ_CLS"), ("bert", "SEQ_CLS"), ("roberta", "TOKEN_CLS")]
)
def test_drawn_positions_with_stand_ins_on_padding_match_the_naive_definition(arch, task, engine):
    """Drawn positions put their stand-ins on padding, whose keys no real query reads: written with gradient, they
    still give the naive definition's loss and gradients."""
    model = wrap(build_model(arch, task), task, lora=False, engine=engine, selection_ratio=0.5)
    batch = make_batch(model, task)
    naive = copy.deepcopy(model).get_base_model()
    output = model(**batch)
    assert (output.selected_positions == -1).any()  # the padded row's slots hold stand-ins
    assert model.base_model.tokentune_engine.engine_used == engine
    output.loss.backward()
    expected = naive_tokentune_loss(naive, batch, output.selected_positions, task, 0, None)
    expected.backward()
    torch.testing.assert_close(output.loss, expected, rtol=1e-5, atol=1e-6)
    assert_same_grads(model, naive)
