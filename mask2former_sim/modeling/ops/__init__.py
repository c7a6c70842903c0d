from .ms_deform_attn import cuda_op_available, ms_deform_attn, ms_deform_attn_torch

__all__ = ["ms_deform_attn", "ms_deform_attn_torch", "cuda_op_available"]
