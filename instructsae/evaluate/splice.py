"""The language-model view of an SAE: next-token loss with its reconstruction spliced into the forward pass.

Each sequence runs clean; with each SAE's reconstruction replacing its site at its layer (resid_post, the
output of that decoder layer, unless it reads another site); and with that site zero-ablated. A transcoder
reads its site (the MLP's input) and replaces its target (the MLP's output): it stands in for the MLP.
Only the positions the store holds are replaced: a dropped first token (the attention
sink) was never seen by the SAE and stays clean in both. A prediction counts where it is made at a stored
position and predicts a stored token, so each counted prediction is one the splice can change; its role is
that of the token predicted.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from instructsae.evaluate.dialogues import StoredSequence
from instructsae.errors import UserError
from instructsae.lm.batches import length_batches, padded_batch
from instructsae.lm.logits import head_mismatch, logits_from_hidden
from instructsae.lm.hooks import site_module
from instructsae.lm.models import decoder_layers
from instructsae.schemas.manifest import ROLES

Replacement = Callable[[torch.Tensor], torch.Tensor]  # residual x_ND -> what the model gets instead
QUANTITIES = ("ce_clean", "ce_spliced", "ce_ablated", "kl_spliced", "kl_ablated")
LOGIT_ROWS = 512  # positions whose vocabulary-wide log-probabilities are held at once


def sae_replacement(sae: torch.nn.Module) -> Replacement:
    """The SAE's reconstruction, computed in float32 and handed back in the model's dtype."""
    return lambda x_ND: sae(x_ND.float()).to(x_ND.dtype)


def zero_replacement(x_ND: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x_ND)


INPUT_SITES = ("resid_pre", "mlp_in")  # a module's input; the other sites are a module's output


def _replaced(hidden_BSD: torch.Tensor, source_BSD: torch.Tensor, first_stored: int,
              replace: Replacement) -> torch.Tensor:
    """hidden with positions >= first_stored replaced by replace(source) at those positions."""
    hidden_BSD = hidden_BSD.clone()
    stored_BSD = source_BSD[:, first_stored:]
    hidden_BSD[:, first_stored:] = replace(stored_BSD.reshape(-1, stored_BSD.shape[-1])).view(
        *stored_BSD.shape[:2], -1)
    return hidden_BSD


def splice_hooks(layer_module: torch.nn.Module, site: str, target: str, first_stored: int,
                 replace: Replacement) -> list:
    """Hooks that write replace(activations at `site`) in place of the activations at `target` (an SAE: the
    same site) at positions >= first_stored; a transcoder's site is read on its way past."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    if site != target:
        def keep(_module, args, kwargs, output=None):
            value = output if site not in INPUT_SITES else (args[0] if args else kwargs["hidden_states"])
            seen["source"] = value[0] if isinstance(value, tuple) else value

        module = site_module(layer_module, site)
        handles.append(module.register_forward_pre_hook(keep, with_kwargs=True) if site in INPUT_SITES else
                       module.register_forward_hook(lambda m, a, o: keep(m, a, {}, o)))
    target_module = site_module(layer_module, target)
    if target in INPUT_SITES:
        def pre_hook(_module, args, kwargs):
            hidden_BSD = args[0] if args else kwargs["hidden_states"]
            new_BSD = _replaced(hidden_BSD, seen.get("source", hidden_BSD), first_stored, replace)
            return ((new_BSD, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new_BSD})

        handles.append(target_module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        return handles

    def hook(_module, _inputs, output):
        hidden_BSD = output[0] if isinstance(output, tuple) else output
        new_BSD = _replaced(hidden_BSD, seen.get("source", hidden_BSD), first_stored, replace)
        return (new_BSD, *output[1:]) if isinstance(output, tuple) else new_BSD

    handles.append(target_module.register_forward_hook(hook))
    return handles


@torch.no_grad()
def final_hidden(model: torch.nn.Module, layer: int, input_ids_BS: torch.Tensor, first_stored: int,
                 replace: Replacement | None, site: str = "resid_post", target: str | None = None) -> torch.Tensor:
    """[batch, seq, d_model] last hidden states (after the final norm), with positions >= first_stored of
    `layer`'s `target` site (default: `site`, resid_post: the layer's output) replaced by replace(site's
    activations). No attention mask: padding is on the right, and causal attention keeps it from every real
    token (as in extract)."""
    handles = [] if replace is None else splice_hooks(decoder_layers(model)[layer], site, target or site,
                                                      first_stored, replace)
    try:
        return model.base_model(input_ids=input_ids_BS, use_cache=False).last_hidden_state
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def clean_run(model: torch.nn.Module, layer: int, input_ids_BS: torch.Tensor) -> tuple[torch.Tensor, list]:
    """The clean final hidden states, and for `reused_lower_layers` whether each decoder layer below `layer`
    returned a tuple and what `layer` returned."""
    layers = decoder_layers(model)[:layer + 1]
    outputs: list = []

    def keep(module, _inputs, output):
        outputs.append(output if module is layers[-1] else isinstance(output, tuple))

    handles = [module.register_forward_hook(keep) for module in layers]
    try:
        return final_hidden(model, layer, input_ids_BS, 0, None), outputs
    finally:
        for handle in handles:
            handle.remove()


def copy_of(output):
    """A layer's output (a tensor, or a tuple starting with one) with its hidden states copied: the runs that
    reuse it must not see each other's changes."""
    return (output[0].clone(), *output[1:]) if isinstance(output, tuple) else output.clone()


@contextmanager
def reused_lower_layers(model: torch.nn.Module, layer: int, clean_outputs: list) -> Iterator[None]:
    """Inside, decoder layers below `layer` hand their input on untouched and `layer` returns what it returned
    in the clean run of the same batch: nothing a run changes at `layer`'s output can change them, so a spliced
    run computes only the layers above (about half the model at a middle layer)."""
    layers = decoder_layers(model)[:layer + 1]
    saved = [module.__dict__.get("forward") for module in layers]  # an instance's own forward (accelerate's)

    def passing_on(returns_tuple: bool):
        return lambda hidden_states, *args, **kwargs: (hidden_states,) if returns_tuple else hidden_states

    for module, returns_tuple in zip(layers[:-1], clean_outputs[:-1]):
        module.forward = passing_on(returns_tuple)
    layers[-1].forward = lambda *args, **kwargs: copy_of(clean_outputs[-1])
    try:
        yield
    finally:
        for module, forward in zip(layers, saved):
            if forward is None:
                del module.forward
            else:
                module.forward = forward


def lower_layers_can_be_reused(model: torch.nn.Module, layer: int, input_ids_BS: torch.Tensor,
                               clean_BSD: torch.Tensor, clean_outputs: list) -> bool:
    """Does a run reusing the lower layers give the clean run's hidden states? Not for a model whose upper
    layers read more than the layer below hands them (layers sharing a KV cache, say): it then runs whole."""
    try:
        with reused_lower_layers(model, layer, clean_outputs):
            again_BSD = final_hidden(model, layer, input_ids_BS, 0, None)
    except Exception:  # any architecture this cannot skip layers of: run it whole, as before
        return False
    return again_BSD.shape == clean_BSD.shape and torch.allclose(again_BSD, clean_BSD, rtol=1e-4, atol=1e-5)


def log_probs(model: torch.nn.Module, hidden_ND: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(logits_from_hidden(model, hidden_ND), dim=-1)


HEAD_TOLERANCE = 1e-3  # relative to the logits' spread; a reproduced head differs by ~1e-6 (rounding)


def check_head(model: torch.nn.Module, sequences: list[StoredSequence], device: str) -> None:
    """Refuse, before any figure is computed, a model whose logits this view would get wrong (see lm/logits.py)."""
    ids_1S = torch.from_numpy(sequences[0].token_ids[:64].astype(np.int64))[None].to(device)
    gap = head_mismatch(model, ids_1S)
    if not gap <= HEAD_TOLERANCE:
        raise UserError(f"the LM view cannot reproduce the logits of {type(model).__name__} from its last hidden "
                        f"states (relative gap {gap:.2g}): --lm-tokens 0 skips the LM view")


@torch.no_grad()
def token_losses(model: torch.nn.Module, clean_ND: torch.Tensor, spliced_SND: list[torch.Tensor],
                 ablated_ND: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
    """[n_saes, len(QUANTITIES), N] per prediction: cross-entropy of each run, KL(clean || spliced),
    KL(clean || ablated). The clean and ablated log-probabilities are computed once for all SAEs."""
    rows = [torch.zeros(len(spliced_SND), len(QUANTITIES), 0, device=targets_N.device)]  # may predict nothing
    for start in range(0, len(targets_N), LOGIT_ROWS):
        part = slice(start, start + LOGIT_ROWS)
        clean_NV, ablated_NV = log_probs(model, clean_ND[part]), log_probs(model, ablated_ND[part])
        target_N1 = targets_N[part, None]
        p_clean_NV = clean_NV.exp()
        ce_clean_N, ce_ablated_N = -clean_NV.gather(-1, target_N1)[:, 0], -ablated_NV.gather(-1, target_N1)[:, 0]
        kl_ablated_N = (p_clean_NV * (clean_NV - ablated_NV)).sum(-1)
        per_sae = []
        for spliced_ND in spliced_SND:
            spliced_NV = log_probs(model, spliced_ND[part])
            per_sae.append(torch.stack([ce_clean_N, -spliced_NV.gather(-1, target_N1)[:, 0], ce_ablated_N,
                                        (p_clean_NV * (clean_NV - spliced_NV)).sum(-1), kl_ablated_N]))
        rows.append(torch.stack(per_sae))
    return torch.cat(rows, dim=2)


def summarize(sums_Q: np.ndarray, n_tokens: int) -> dict:
    """Means of the QUANTITIES and CE loss recovered = (CE_ablated − CE_spliced) / (CE_ablated − CE_clean)."""
    means = dict(zip(QUANTITIES, (float(value) for value in sums_Q / max(n_tokens, 1))))
    gap = means["ce_ablated"] - means["ce_clean"]
    recovered = (means["ce_ablated"] - means["ce_spliced"]) / gap if gap != 0 else None
    return {**means, "ce_loss_recovered": recovered, "n_tokens": int(n_tokens)}


def summarize_by_role(sums_QR: np.ndarray, count_R: np.ndarray) -> dict:
    """Overall figures (sums over roles) and per role, for the roles of the predicted tokens that occur."""
    per_role = {name: summarize(sums_QR[:, code], count_R[code])
                for code, name in enumerate(ROLES) if count_R[code] > 0}
    return {**summarize(sums_QR.sum(axis=1), count_R.sum()), "per_role": per_role}


@torch.no_grad()
def lm_view(model: torch.nn.Module, layer: int, saes: list[torch.nn.Module], sequences: list[StoredSequence],
            first_stored: int, batch_tokens: int, pad_id: int, device: str = "cpu", site: str = "resid_post",
            target: str | None = None) -> list[dict]:
    """Per SAE: CE clean / spliced / ablated, CE loss recovered and KLs over the sequences, overall and per
    role, and under 'per_sequence' the sums behind them per sequence and role (numpy arrays). The clean and
    ablated runs are shared by all the SAEs (of one layer), so K SAEs cost K + 2 forward passes per batch, not
    3K; and all runs but the clean one compute only the layers above the splice. `site`/`target`: what the SAEs
    read and replace (a transcoder: mlp_in and mlp_out)."""
    target = target or site
    # nothing a splice does reaches below the layer's output (resid_post) or, for a site inside it, its input
    reused = layer if site == target == "resid_post" else layer - 1
    # per sequence (the order of `sequences`) and role of the predicted token, for a bootstrap over sequences
    sums_SIQR = np.zeros((len(saes), len(sequences), len(QUANTITIES), len(ROLES)))
    count_IR = np.zeros((len(sequences), len(ROLES)), dtype=np.int64)
    lengths = [len(sequence.token_ids) for sequence in sequences]
    reuse = None  # whether the spliced runs may skip the layers below the splice: checked on the first batch
    with tqdm(total=sum(len(s.roles) for s in sequences), desc="LM view", unit="tok", unit_scale=True,
              dynamic_ncols=True) as bar:
        for batch in length_batches(lengths, batch_tokens):
            input_ids_BS = padded_batch(sequences, batch, pad_id).to(device)
            clean_BSD, clean_outputs = clean_run(model, max(reused, 0), input_ids_BS)
            if reuse is None:
                reuse = reused >= 0 and lower_layers_can_be_reused(model, reused, input_ids_BS, clean_BSD,
                                                                   clean_outputs)
            with reused_lower_layers(model, reused, clean_outputs) if reuse else nullcontext():
                ablated_BSD = final_hidden(model, layer, input_ids_BS, first_stored, zero_replacement, site, target)
                spliced_SBSD = [final_hidden(model, layer, input_ids_BS, first_stored, sae_replacement(sae), site,
                                             target) for sae in saes]
            del clean_outputs
            for row, index in enumerate(batch):
                # predictions made at stored positions first_stored .. n-2 of the stored tokens 1 ..
                made_at = slice(first_stored, lengths[index] - 1)
                targets_N = input_ids_BS[row, first_stored + 1: lengths[index]]
                losses_SQN = token_losses(model, clean_BSD[row, made_at],
                                          [spliced_BSD[row, made_at] for spliced_BSD in spliced_SBSD],
                                          ablated_BSD[row, made_at], targets_N).double().cpu().numpy()
                roles_N = sequences[index].roles[1:]
                for s_index in range(len(saes)):
                    for q in range(len(QUANTITIES)):
                        sums_SIQR[s_index, index, q] = np.bincount(roles_N, weights=losses_SQN[s_index, q],
                                                                   minlength=len(ROLES))
                count_IR[index] = np.bincount(roles_N, minlength=len(ROLES))
                bar.update(len(sequences[index].roles))
    instances = np.array([sequence.instance for sequence in sequences], dtype=np.int64)
    return [{**summarize_by_role(sums_IQR.sum(axis=0), count_IR.sum(axis=0)),
             "per_sequence": {"instance_I": instances, "sums_IQR": sums_IQR, "count_IR": count_IR}}
            for sums_IQR in sums_SIQR]
