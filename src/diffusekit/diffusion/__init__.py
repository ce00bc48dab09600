"""The forward process as pure tensor math: schedules, parametrizations, inference grids."""
