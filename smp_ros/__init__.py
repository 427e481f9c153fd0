"""smp_ros: the Skill Mixture-of-Experts diffusion Policy (SMP) for bimanual AgileX PiPER arms."""

__version__ = "0.1.0"
