"""Box helpers shared by inference, copy-paste and the data generator's checks."""
import torch


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight XYXY boxes (x1, y1 exclusive) of (N, H, W) boolean masks; empty masks give zeros.

    Vectorised over N (no per-mask loop or host sync).
    """
    n, h, w = masks.shape
    if n == 0:
        return masks.new_zeros((0, 4), dtype=torch.float32)
    x_any = masks.any(dim=1)
    y_any = masks.any(dim=2)
    xs = torch.arange(w, device=masks.device)
    ys = torch.arange(h, device=masks.device)
    x0 = torch.where(x_any, xs, w).amin(dim=1)
    x1 = torch.where(x_any, xs, -1).amax(dim=1) + 1
    y0 = torch.where(y_any, ys, h).amin(dim=1)
    y1 = torch.where(y_any, ys, -1).amax(dim=1) + 1
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
    return torch.where(x_any.any(dim=1, keepdim=True), boxes, torch.zeros_like(boxes))
