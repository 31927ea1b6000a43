"""What every op family shares and none owns: bit formats, the torch/Triton dispatch, the CPU
lowering after partitioning, native C builds, dtype and number helpers, and Triton helpers
(``triton_helpers``, imported only by the Triton twins)."""
