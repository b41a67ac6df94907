"""The life of a propagation model: fine-tuning on the archive (`finetune.py`), the registry and its
promotion gate (`registry.py`). Which active model contours an ROI is the job flow's question:
`pipeline/model_routing.py`."""
