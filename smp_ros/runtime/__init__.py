"""Running a trained policy: inference engine and backends, chunk executor, safety filter, and the
closed-loop adapter that joins them (docs/ARCHITECTURE.md, 'Runtime API'). Nothing here imports
rclpy; the policy node and the simulator harness drive these objects."""
