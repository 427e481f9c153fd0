"""Thin rclpy nodes over the ROS-free core (hardware, sim, runtime), plus bringup, record and what the
launch files share (launch_common).

The only package that imports rclpy and message packages. The parameters file is read without ROS
by ``smp_ros.ros_params``, so the CLI reads the same file the nodes get.
"""
