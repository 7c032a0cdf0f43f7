"""The hierarchical family's encoder as one autograd Function with a hand-written backward.

`Hierarchical.reference_groups` is the encoder written as plain autograd, the readable definition of
eqs. 2-6; `Hierarchical.encode` runs this Function, whose numbers and gradients tests/test_fused.py holds
to that reference. Written as autograd, a training step of the hierarchical model ran 251 aten ops against
the baseline's 102, and ran 1.56x its ops' isolated time where the baseline ran 1.33x
(`benchmarks/step_floor.py`): each small op costs the step more than its arithmetic. Here:

- the queries (x − b_d + p_t) W_q / √E are more columns of the encoder's product, x [W_enc | W_q / √E],
  and so is their weight gradient, x^T [g_pre | g_q], one product in the slow transposed layout, not two;
- the position table meets every weight in one product, p [W_p | W_q / √E | W_k | W_v], and its gradient
  leaves in one product the other way, where autograd ran four of each and summed them;
- the features are written into one [B, K] tensor and their gradient into one, with no split or cat of
  the global and position halves; the bias is added in the encoder product's epilogue;
- each token's rows of the position tables join the product's output in place, as a product with the
  tokens' one-hot positions [B, T] (one pass where a gather and an add were two), and the backward's
  per-position sums are the same one-hot's product the other way; the batch sums of the position
  columns are then sums of those T rows;
- α_t is added in the epilogue of W_o's product (h1 + o W_o in one op);
- every weight's gradient is formed in its own dtype in place, without autograd's casts and sums.

The arithmetic is the reference's up to rounding: the same bf16 products, summed in another order.
"""

from __future__ import annotations

import torch
from torch import Tensor

from posae.saes.base import linear, plus_product, vec_mat

threshold_backward = torch.ops.aten.threshold_backward


def relu_grad_into(grad: Tensor, out: Tensor, into: Tensor) -> Tensor:
    """`into` = `grad` where `out` > 0, else 0 (ReLU's backward, given ReLU's output), written in place."""
    return threshold_backward.grad_input(grad, out, 0, grad_input=into)


class HierarchicalEncode(torch.autograd.Function):
    """f = [ReLU(pre_g) ; g_t ⊙ ReLU(ReLU(pre_p + W_p p_t) + α_t)], pre = x W_enc + (b_enc − b_dec W_enc).

    Arguments: x [B, D] in the compute dtype (it sets the dtype of every product), pos [B] (int64),
    the number of global features G, the heads H, whether to also return the position features as a
    tensor of their own (for a loss on them, without a [B, K] detour in its gradient), then the
    parameters W_enc [D, K], b_enc [K], b_dec [D], p [T, D], W_q, W_k, W_v [D, X] and W_o [X, P]
    (None without attention), gate logits [T, P] (None without a gate). Returns (f [B, K], f_p [B, P]
    or None). Parameters may be float32 or the compute dtype; their gradients come back in theirs.
    """

    @staticmethod
    def forward(ctx, x_BD: Tensor, pos_B: Tensor, n_global: int, heads: int, want_position: bool,
                W_DK: Tensor, b_enc_K: Tensor, b_dec_D: Tensor, p_TD: Tensor, W_q_DX: Tensor | None,
                W_k_DX: Tensor | None, W_v_DX: Tensor | None, W_o_XP: Tensor | None,
                gate_TP: Tensor | None) -> tuple[Tensor, Tensor | None]:
        c, G, K = x_BD.dtype, n_global, W_DK.shape[1]
        P, N = K - G, K + (W_q_DX.shape[1] if W_q_DX is not None else 0)
        attend, gated = W_q_DX is not None, gate_TP is not None
        saved: list[Tensor | None] = [None] * 9
        with torch.autocast(x_BD.device.type, enabled=False):
            if attend:
                # The queries (x − b_d + p_t) W_q / √E are X more columns of the encoder with no bias of their
                # own, so x meets [W_enc | W_q / √E] in one product, and p_t's share comes with W_p's below.
                T, H, X = p_TD.shape[0], heads, W_q_DX.shape[1]
                B, E = x_BD.shape[0], X // H
                W_DN = torch.cat([W_DK, W_q_DX * E**-0.5], dim=1)
                b_N = torch.cat([b_enc_K, b_enc_K.new_zeros(X)])
            else:
                W_DN, b_N = W_DK, b_enc_K
            Wc_DN = W_DN.to(c)
            # The bias in the product's epilogue (`linear`), so the global half needs a ReLU alone and the
            # position and query columns' tables none of their own.
            bias_N = (b_N - vec_mat(b_dec_D, W_DN)).to(c)
            pre_BN = linear(x_BD, Wc_DN, bias_N)
            # Every product of the position table in one: p [W_p | W_q / √E | W_k | W_v].
            Wtab_DM = torch.cat([Wc_DN[:, G:], W_k_DX.to(c), W_v_DX.to(c)], dim=1) if attend else Wc_DN[:, G:]
            p_c_TD = p_TD.to(c)
            tabs_TM = p_c_TD @ Wtab_DM
            # Each token's row of the position and query tables, added in place as a product with the tokens'
            # one-hot positions: one pass over [B, P + X] where a gather and an add were two. Exact: each
            # product has a single term.
            one_hot_BT = x_BD.new_zeros(x_BD.shape[0], p_TD.shape[0])
            one_hot_BT[torch.arange(x_BD.shape[0], device=x_BD.device), pos_B] = 1
            pre_BN[:, G:].addmm_(one_hot_BT, tabs_TM[:, :N - G])
            h1_BP = torch.clamp_min(pre_BN[:, G:K], 0)  # contiguous, for the ops that read it
            f_BK = torch.empty(x_BD.shape[0], K, dtype=c, device=x_BD.device)
            torch.clamp_min(pre_BN[:, :G], 0, out=f_BK[:, :G])
            if attend:
                q_BX = pre_BN[:, K:].contiguous()
                q_HBE = q_BX.view(B, H, E).transpose(0, 1)
                k_HET = tabs_TM[:, P + X:P + 2 * X].reshape(T, H, E).permute(1, 2, 0)
                v_HTE = tabs_TM[:, P + 2 * X:].reshape(T, H, E).transpose(0, 1)
                a_HBT = torch.bmm(q_HBE, k_HET).softmax(dim=-1)
                o_BX = torch.bmm(a_HBT, v_HTE).transpose(0, 1).reshape(B, X)
                Wo_c = W_o_XP.to(c)
                h2_BP = plus_product(h1_BP, o_BX, Wo_c).relu_()  # ReLU(h1 + α), α = o W_o
                saved[:6] = [q_HBE, k_HET, v_HTE, a_HBT, o_BX, Wo_c]
            else:
                h2_BP = h1_BP
            if gated:
                sig_TP = torch.sigmoid(gate_TP)
                gate_BP = sig_TP.to(c).index_select(0, pos_B)
                torch.mul(h2_BP, gate_BP, out=f_BK[:, G:])
                saved[6:8] = [sig_TP, gate_BP]
            else:
                f_BK[:, G:] = h2_BP
            saved[8] = h2_BP
        ctx.save_for_backward(x_BD, pos_B, one_hot_BT, W_DN, Wc_DN, b_dec_D, p_c_TD, Wtab_DM, f_BK, h1_BP, *saved)
        ctx.n_global, ctx.heads = G, heads
        ctx.dtypes = (W_DK.dtype, b_enc_K.dtype, b_dec_D.dtype, p_TD.dtype,
                      *(w.dtype if w is not None else None for w in (W_q_DX, W_k_DX, W_v_DX, W_o_XP, gate_TP)))
        return f_BK, (f_BK[:, G:].clone() if want_position else None)

    @staticmethod
    def backward(ctx, g_f_BK: Tensor, g_fp_BP: Tensor | None):
        (x_BD, pos_B, one_hot_BT, W_DN, Wc_DN, b_dec_D, p_c_TD, Wtab_DM, f_BK, h1_BP,
         q_HBE, k_HET, v_HTE, a_HBT, o_BX, Wo_c, sig_TP, gate_BP, h2_BP) = ctx.saved_tensors
        G, c, wide = ctx.n_global, f_BK.dtype, W_DN.dtype  # weight gradients are formed in the weights' dtype
        attend, gated = q_HBE is not None, sig_TP is not None
        (B, K), N, T = f_BK.shape, W_DN.shape[1], p_c_TD.shape[0]
        P, X = K - G, N - K
        g_f_BK = g_f_BK.to(c)
        # The gradient of the encoder's whole output [pre | q], in one tensor for one weight-gradient product.
        g_pre_BN = torch.empty(B, N, dtype=c, device=f_BK.device)
        relu_grad_into(g_f_BK[:, :G], f_BK[:, :G], g_pre_BN[:, :G])
        g_p_BP = g_f_BK[:, G:]
        if g_fp_BP is not None:
            g_p_BP = g_p_BP + g_fp_BP.to(c)
        grad_gate = grad_o = grad_k = grad_v = None
        if gated:
            g_gate_BP = g_p_BP * h2_BP
            g_gate_TP = g_gate_BP.new_zeros(T, P).index_add_(0, pos_B, g_gate_BP)
            grad_gate = torch.ops.aten.sigmoid_backward(g_gate_TP.to(sig_TP.dtype), sig_TP).to(ctx.dtypes[8])
            g_h2_BP = g_p_BP * gate_BP
        else:
            g_h2_BP = g_p_BP
        if attend:
            H = ctx.heads
            E = X // H
            # The gradient of α and of h1 (h2 = ReLU(h1 + α)); in place where g_h2 is this backward's own.
            g_a_BP = relu_grad_into(g_h2_BP, h2_BP, g_h2_BP) if gated else threshold_backward(g_h2_BP, h2_BP, 0)
            grad_o = torch.mm(o_BX.T, g_a_BP).to(ctx.dtypes[7])
            g_o_HBE = torch.mm(g_a_BP, Wo_c.T).view(B, H, E).transpose(0, 1)
            g_v_HTE = torch.bmm(a_HBT.transpose(1, 2), g_o_HBE)
            g_s_HBT = torch._softmax_backward_data(torch.bmm(g_o_HBE, v_HTE.transpose(1, 2)), a_HBT, -1, c)
            g_pre_BN[:, K:].view(B, H, E).copy_(torch.bmm(g_s_HBT, k_HET.transpose(1, 2)).transpose(0, 1))
            g_k_TX = torch.bmm(q_HBE.transpose(1, 2), g_s_HBT).permute(2, 0, 1).reshape(T, X)
            g_v_TX = g_v_HTE.transpose(0, 1).reshape(T, X)
        else:
            g_a_BP = g_h2_BP
        relu_grad_into(g_a_BP, h1_BP, g_pre_BN[:, G:K])
        # Σ over each position's tokens of [g_p | g_q] as one product with their one-hot positions: index_add_
        # from these strided columns of a [B, N] tensor takes 8x its time from a contiguous one.
        g_tabs_TM = one_hot_BT.T @ g_pre_BN[:, G:]
        # Σ over the batch of the whole [g_pre | g_q]: the global columns' from the batch, the rest from their
        # per-position sums, a [T]-row sum where the batch's would be a [B]-row one.
        g_N = torch.cat([g_pre_BN[:, :G].sum(0), g_tabs_TM.sum(0)]).to(wide)
        if attend:
            g_tabs_TM = torch.cat([g_tabs_TM, g_k_TX, g_v_TX], dim=1)
        # The two products of every position-table gradient: p's, and the weights' [W_p | W_q / √E | W_k | W_v].
        grad_p = torch.mm(g_tabs_TM, Wtab_DM.T).to(ctx.dtypes[3])
        g_Wtab_DM = torch.mm(p_c_TD.T, g_tabs_TM).to(wide)
        # _PreActs's backward over [W_enc | W_q / √E], plus W_p's and W_q's shares from the table.
        grad_W_DN = torch.mm(x_BD.T, g_pre_BN).to(wide).addr_(b_dec_D, g_N, alpha=-1)
        grad_W_DN[:, G:] += g_Wtab_DM[:, :P + X]
        grad_b_dec = -vec_mat(g_N, W_DN.T)
        grad_x = torch.mm(g_pre_BN, Wc_DN.T) if ctx.needs_input_grad[0] else None
        grad_q = None
        if attend:
            grad_q = grad_W_DN[:, K:].mul((X // ctx.heads) ** -0.5).to(ctx.dtypes[4])
            grad_k = g_Wtab_DM[:, P + X:P + 2 * X].to(ctx.dtypes[5])
            grad_v = g_Wtab_DM[:, P + 2 * X:].to(ctx.dtypes[6])
        return (grad_x, None, None, None, None, grad_W_DN[:, :K].to(ctx.dtypes[0]), g_N[:K].to(ctx.dtypes[1]),
                grad_b_dec.to(ctx.dtypes[2]), grad_p, grad_q, grad_k, grad_v, grad_o, grad_gate)
