"""Training (single process or DDP), fine-tuning modes and skill diagnostics; no ROS imports."""
