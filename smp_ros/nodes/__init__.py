"""Thin rclpy nodes over the ROS-free core (hardware, sim, runtime), plus bringup and record.

The only package that imports rclpy and message packages. ``params`` is ROS-free so the CLI can
read the same parameters file the nodes get.
"""
