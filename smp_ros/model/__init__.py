"""The SMP policy as a ROS-free library: encoder, skill basis, Dirichlet gates, diffusion experts,
scheduler, expert selection, policies, normalizer and checkpoints (Section 4 and Appendix A of the
SMP paper)."""
