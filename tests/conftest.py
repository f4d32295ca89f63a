"""Make the top-level scripts importable from tests, pin threads, and share the tiny-model flags."""
import os
import sys

# One thread per process, here and in every script a test starts (they inherit the environment):
# torch's default of one thread per core oversubscribes a busy 2-core machine and made the suite
# 10-15x slower (47 min instead of 3).
for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[var] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402  (after the environment is set)

torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# A tiny random-init ViT on the synthetic CIFAR-shaped set: seconds on a laptop CPU.
TINY = ["--dataset", "synthetic", "--arch", "test_vit", "--no-pretrained", "--img-size", "32",
        "--device", "cpu"]

# The slow tests, left out of the fast lane (`python -m pytest -m "not slow"`, for the edit-test loop);
# the full suite runs them all. A file's name marks all of it, FILE::TEST one test (and its parameters).
# Chosen by measured duration (pytest --durations, 2026-12-02): every test that took 13 s or more on the
# busy 2-core machine, then every other one that took 1 s or more on the idle machine: whole runs,
# studies, signals, benchmarks.
SLOW = [
    "test_run_all.py",
    "test_dynamics.py",
    "test_benchmarks.py",
    "test_compile.py",
    "test_compare.py::test_dry_run_says_how_many_runs_and_how_long_the_extensions_add",
    "test_estimate.py::test_making_a_stand_in_says_so_once",
    "test_tensorboard.py::test_a_killed_and_resumed_fedavg_run_logs_each_metrics_row_once",
    "test_tensorboard.py::test_centralized_logs_each_trial_as_a_run_of_its_own",
    "test_tensorboard.py::test_model_editing_logs_epoch_0_and_each_epoch",
    "test_centralized.py::test_missing_and_corrupt_weights_are_one_line_errors",
    "test_centralized.py::test_interrupted_run_resumes_to_the_same_result",
    "test_centralized.py::test_short_run_learns_far_above_chance",
    "test_centralized.py::test_refuses_a_directory_holding_a_different_run",
    "test_centralized.py::test_grid_and_scheduler_comparison_pick_the_best",
    "test_centralized.py::test_malformed_hparams_are_refused_before_features_or_a_run_dir",
    "test_common.py::test_dino_and_timm_weight_files_load_and_agree",
    "test_editing.py::test_editing_reuses_a_saved_mask_and_rejects_a_bad_one",
    "test_editing.py::test_short_edit_improves_validation_accuracy_over_the_frozen_head",
    "test_editing.py::test_interrupted_edit_resumes_to_the_same_weights",
    "test_editing.py::test_sparse_fine_tuning_touches_exactly_the_masked_in_weights",
    "test_editing.py::test_head_sources_warmup_and_file",
    "test_fedavg.py::test_iid_learns_and_one_class_per_client_learns_less",
    "test_fedavg.py::test_interrupted_run_resumes_to_the_same_files",
    "test_fedavg.py::test_a_stop_signal_checkpoints_at_the_round_boundary_and_resumes",
    "test_fedavg.py::test_a_kill_between_the_mask_and_the_checkpoint_recalibrates",
    "test_fedavg.py::test_sparse_fedavg_keeps_the_head_and_the_masked_out_entries_bit_identical",
    "test_fedavg.py::test_bad_flag_end_to_end_is_one_line_and_exit_2",
    "test_fedavg.py::test_sparse_fedavg_reuses_a_mask_file",
    "test_fedavg.py::test_dense_fedavg_starts_from_the_given_head_file",
    "test_reference.py::test_default_mask_equals_the_talos_port",
    "test_reference.py::test_calibrated_mask_equals_the_talos_port",
    "test_safety.py::test_sigterm_during_calibration_stops_within_seconds",
    "test_safety.py::test_an_orphan_dies_with_run_all",
    "test_safety.py::test_a_script_exits_143_with_a_checkpoint_on_sigterm",
    "test_safety.py::test_sigterm_during_feature_extraction_stops_within_seconds_and_says_nothing_was_saved",
    "test_safety.py::test_sigterm_mid_editing_saves_the_step_and_resumes_to_the_same_model",
    "test_safety.py::test_a_run_written_before_a_flag_existed_is_the_run_of_that_flags_default",
    "test_safety.py::test_a_full_disk_is_one_line_and_the_last_checkpoint_is_kept",
    "test_safety.py::test_an_empty_path_is_refused_in_every_path_flag",
    "test_safety.py::test_a_resumed_run_reads_only_its_own_files",
    "test_safety.py::test_resume_in_a_read_only_run_folder_is_one_line_and_changes_nothing",
    "test_safety.py::test_no_file_the_code_reads_can_run_code",
    "test_safety.py::test_a_diverging_run_stops_at_once_with_one_line_and_no_result",
    "test_safety.py::test_run_files_of_the_wrong_kind_are_one_line",
    "test_safety.py::test_identical_runs_write_byte_identical_files",
    "test_safety.py::test_a_folder_not_known_to_be_this_runs_is_not_touched",
    "test_safety.py::test_an_edit_on_a_given_mask_is_filed_under_that_masks_settings",
    "test_safety.py::test_input_files_that_fit_only_in_shape_are_refused",
    "test_safety.py::test_a_second_writer_is_refused_naming_the_pid_and_a_dead_ones_lock_does_not_block",
    "test_safety.py::test_stale_temporaries_are_cleaned_and_a_dir_holding_only_them_is_empty",
    "test_summarize.py::test_summary_plots_in_percent_with_integer_rounds_error_bars_and_two_decimals",
    "test_summarize.py::test_plots_heatmap_curves_and_agreement",
    # measured 2026-12-02 on an idle 2-core machine: 1 s or more each in the fast lane
    "test_run_all_safety.py::test_only_well_formed_lines_of_an_old_plan_are_carried_into_the_new_one",
    "test_run_all_safety.py::test_a_non_ascii_root_under_lc_all_c_is_quoted_so_python_reads_it",
    "test_run_all_safety.py::test_a_link_at_a_runs_log_is_refused_before_the_first_run",
    "test_run_all_safety.py::test_a_dry_run_reads_a_weights_file_and_makes_no_stand_in",
    "test_run_all_safety.py::test_a_tab_or_newline_in_a_config_key_keeps_the_plan_whole",
    "test_run_all_safety.py::test_a_root_with_glob_characters_is_summarized",
    "test_heads.py::test_fedavg_learns_a_zero_head_and_iid_learns_more_than_one_class_per_client",
    "test_run_all_safety.py::test_temporary_names_in_the_root_steer_no_write",
    "test_run_all_safety.py::test_a_dry_run_says_that_cifar100_is_missing_offline",
    "test_run_all_safety.py::test_results_starting_with_a_dash_is_a_folder_not_a_flag",
    "test_safety.py::test_ctrl_c_checkpoints_at_the_round_boundary_exits_130_and_resumes_to_the_same_run",
    "test_faults.py::test_racing_starts_give_one_writer_and_leave_the_winners_files",
    "test_run_all_safety.py::test_a_stop_before_the_first_run_ends_the_planner_quietly_and_leaves_no_root",
    "test_algorithms.py::test_an_algorithm_at_its_neutral_setting_is_fedavg_bit_for_bit",
    "test_run_all_safety.py::test_a_run_behind_a_wrapper_that_does_not_exec_lives_and_dies_with_run_all",
    "test_algorithms.py::test_scaffold_state_survives_a_resume_across_the_head_warmup",
    "test_heads.py::test_a_zero_head_run_resumes_bit_exact",
    "test_faults.py::test_a_fifo_in_a_root_does_not_hang_summarize_and_a_c_locale_writes_utf8",
    "test_algorithms.py::test_every_algorithm_resumes_bit_for_bit_and_keeps_masked_entries",
    # measured 2026-12-08 on the busy 2-core machine: 1 s or more each
    "test_algorithms.py::test_a_stop_between_two_clients_saves_the_rounds_start_and_resumes_to_the_same_model",
    "test_algorithms.py::test_scaffold_converges_on_heterogeneous_quadratics_where_fedavg_drifts_at_the_default_momentum",
    "test_algorithms.py::test_fedprox_local_steps_follow_autograd_of_the_proximal_objective",
    "test_algorithms.py::test_per_client_state_that_does_not_fit_with_a_margin_is_refused_before_writing_anything",
    "test_algorithms.py::test_a_stopped_round_puts_back_the_weights_the_fp16_scale_and_the_pending_state",
    "test_splits.py::test_every_flag_that_defines_a_run_names_its_directory",
    "test_heads.py::test_round_0_records_the_heads_accuracy_on_clean_and_augmented_training_images",
    "test_summarize.py::test_sparse_evaluations_are_points_and_editing_plots_show_differences",
    "test_safety.py::test_a_resumed_editing_run_says_the_epoch_and_step_it_continues_from",
    "test_faults.py::test_summarize_leaves_out_crafted_files_with_a_warning_each",
    "test_heads.py::test_augmented_ridge_is_fitted_on_the_views_and_federated_equals_central",
    "test_heads.py::test_no_gap_is_measured_without_augmentation",
    "test_faults.py::test_links_in_a_results_root_never_steer_a_write_outside_it",
    "test_faults.py::test_a_stop_while_building_the_stand_in_or_the_data_says_so_and_writes_nothing",
    "test_splits.py::test_a_dirichlet_run_names_its_split_everywhere",
    "test_faults.py::test_one_word_for_the_precision_and_runs_that_wrote_off_still_resume",
    "test_summarize.py::test_no_figure_overlaps_cuts_or_leaves_a_line_unlabelled_and_accuracy_stays_within_0_100",
    # issue 35 (measured 2026-12-08 on the busy 2-core machine)
    "test_faults_round3.py::test_a_second_stop_signal_half_a_second_later_stops_at_once",
    "test_faults_round3.py::test_one_stop_signal_still_waits_for_the_step_and_sigusr1_never_stops_at_once",
    "test_faults_round3.py::test_two_ctrl_c_half_a_second_apart_stop_a_fedavg_round_within_seconds_keeping_its_checkpoint",
    "test_faults_round3.py::test_every_input_file_that_is_no_regular_file_is_one_line_naming_it",
    "test_faults_round3.py::test_a_fifo_as_head_of_a_fedavg_run_is_one_line_and_leaves_no_run",
    "test_faults_round3.py::test_run_all_refuses_a_grid_that_is_a_fifo_or_a_folder_at_once",
    "test_faults_round3.py::test_sigterm_while_run_all_plans_a_big_grid_stops_it_within_seconds_leaving_nothing",
    "test_faults_round3.py::test_a_run_name_whose_log_name_is_too_long_runs_with_a_shorter_log",
    "test_faults_round3.py::test_a_run_name_longer_than_a_file_name_is_one_line_before_anything_is_written",
    "test_faults_round3.py::test_a_flag_after_dashdash_that_a_grid_line_also_sets_is_one_line",
    "test_faults_round3.py::test_slurm_takes_a_big_grid_whose_settings_travel_in_a_file",
    "test_faults_round3.py::test_a_refused_slurm_submission_leaves_nothing_behind",
    "test_faults_round3.py::test_a_second_sigterm_to_run_all_stops_its_runs_at_once",
    # the run's state as its checkpoint, and the third fuzz round's faults (2026-12-08, busy machine: 9-90 s each)
    "test_fedavg.py::test_resume_takes_the_mask_from_the_checkpoint_and_a_planted_link_does_not_survive",
    "test_fedavg.py::test_a_crafted_checkpoint_of_this_run_is_one_line_naming_it",
    "test_fedavg.py::test_a_last_round_whose_server_step_diverges_stops_with_no_result",
    "test_fedavg.py::test_a_new_flag_reaches_result_json_and_results_csv_with_no_edit",
    "test_editing.py::test_an_edit_resumes_with_the_checkpoints_mask_and_refuses_a_crafted_checkpoint",
    "test_faults.py::test_a_feature_cache_of_another_shape_source_or_content_is_recomputed_with_a_warning",
]

# The longest tests, longest first (CPU seconds measured one file at a time, -n 0, 2026-12-08): under
# pytest-xdist they start first (schedule_order). A test's place here changes when it runs, never whether.
LONGEST = [
    "test_run_all.py::test_a_quick_study_killed_then_resumed_then_nothing_to_redo",  # about 100 s
    "test_heads.py::test_fedavg_learns_a_zero_head_and_iid_learns_more_than_one_class_per_client",  # and standin_dir
    "test_dynamics.py::test_standin_is_deterministic_and_cached",
    "test_run_all_safety.py::test_a_dry_run_reads_a_weights_file_and_makes_no_stand_in",
    "test_compile.py::test_a_compiled_run_equals_the_eager_one_to_float_rounding_and_resumes_exactly",
    "test_run_all.py::test_dry_run_estimates_the_time_from_a_probe",
    "test_fedavg.py::test_iid_learns_and_one_class_per_client_learns_less",
    "test_fedavg.py::test_interrupted_run_resumes_to_the_same_files",
    "test_run_all.py::test_settings_are_recorded_only_once_a_run_succeeded",
    "test_run_all.py::test_sigterm_stops_the_running_runs_and_exits_130_and_a_second_study_on_the_root_is_refused",
    "test_run_all.py::test_a_grid_file_runs_per_seed_through_the_same_machinery",
    "test_faults.py::test_racing_starts_give_one_writer_and_leave_the_winners_files",
    "test_benchmarks.py::test_bench_step_times_each_setting_it_is_asked_for",
    "test_run_all_safety.py::test_a_dry_run_says_that_cifar100_is_missing_offline",
    "test_safety.py::test_ctrl_c_checkpoints_at_the_round_boundary_exits_130_and_resumes_to_the_same_run",
    "test_run_all_safety.py::test_a_non_ascii_root_under_lc_all_c_is_quoted_so_python_reads_it",
    "test_run_all.py::test_a_missing_weights_file_stops_the_study_in_seconds_with_one_line",
    "test_run_all.py::test_per_gpu_packs_that_many_runs_on_each_gpu_and_never_more",
    "test_run_all_safety.py::test_a_stop_before_the_first_run_ends_the_planner_quietly_and_leaves_no_root",
    "test_safety.py::test_a_script_exits_143_with_a_checkpoint_on_sigterm",
    "test_safety.py::test_an_orphan_dies_with_run_all",
    "test_dynamics.py::test_fine_tuning_keeps_and_improves_a_partial_step0_head",  # about 7 s a parameter
]


@pytest.fixture(autouse=True)
def no_stop_yet(monkeypatch):
    """Every test starts with no stop requested and no stop signal counted: a run_main in this process leaves
    its signal-counting thread running (plumbing._count_stop_signals), and a count carried over from an
    earlier test would make this test's first signal a second one, which stops the process at once."""
    import plumbing
    monkeypatch.setattr(plumbing, "_stop_signal", None)
    monkeypatch.setattr(plumbing, "_stop_count", 0)


@pytest.fixture(scope="session")
def standin_dir(tmp_path_factory):
    """A data dir holding every stand-in backbone (common.STANDINS), pretrained once per test run (seconds
    each): the pytest-xdist workers share it, the first one there pretrains and a lock makes the others wait,
    instead of each pretraining its own. Runs cache their features there too (written whole, so a reader
    never sees half a file)."""
    import fcntl
    import common
    base = tmp_path_factory.getbasetemp()  # a worker's own folder under the run's, with xdist
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "standins"
    root.mkdir(exist_ok=True)
    with open(root / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        for name in common.STANDINS:
            common.standin_weights(name, str(root))
    return str(root)


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """With pytest-xdist installed (requirements.txt), the suite runs one worker per CPU core unless -n
    says otherwise (-n 0: in this process): its tests are mostly single-threaded script runs, so two
    cores take about half the time. Without pytest-xdist it runs in this process, as always."""
    xdist = config.pluginmanager.hasplugin("xdist")
    if xdist and config.option.numprocesses is None and not config.option.collectonly \
            and not os.environ.get("PYTEST_XDIST_WORKER"):
        config.option.numprocesses = "auto"
    if xdist and getattr(config.option, "maxschedchunk", 0) is None:  # an option since pytest-xdist 3.2
        # Hand a worker one or two tests at a time, in the order of schedule_order, instead of xdist's
        # first quarter of the suite at once: the longest tests then start first on whichever worker is
        # free, and no long test starts last to keep one worker busy while the other idles.
        config.option.maxschedchunk = 1


def slow_entry(nodeid):
    """The SLOW entry that names this test (tests/FILE.py::TEST[param]), or None."""
    path, _, test = nodeid.partition("::")
    name, test = os.path.basename(path), test.split("[")[0]
    return next((e for e in SLOW if e in (name, f"{name}::{test}")), None)


@pytest.hookimpl(tryfirst=True)  # before -k/-m deselect
def pytest_collection_modifyitems(config, items):
    modules = {}
    for item in items:
        modules[os.path.basename(item.nodeid.split("::")[0])] = getattr(item, "module", None)
        if slow_entry(item.nodeid):
            item.add_marker(pytest.mark.slow)
    # An entry naming a test its file no longer has would silently put that test back in the fast lane.
    stale = [e for e in SLOW + LONGEST if "::" in e and e.split("::")[0] in modules
             and not hasattr(modules[e.split("::")[0]], e.split("::")[1])]
    if stale:
        raise pytest.UsageError(f"tests/conftest.py SLOW or LONGEST names a test that does not exist: "
                                f"{', '.join(stale)}")
    if os.environ.get("PYTEST_XDIST_WORKER"):  # every worker sorts alike: xdist checks their collections agree
        items.sort(key=schedule_order)


def schedule_order(item):
    """LONGEST first, in its order, then the other slow tests, then the fast ones (each in file order):
    with two workers the suite ends about when the longest test alone would, not a long test later."""
    path, _, test = item.nodeid.partition("::")
    entry = f"{os.path.basename(path)}::{test.split('[')[0]}"
    if entry in LONGEST:
        return LONGEST.index(entry)
    return len(LONGEST) + (0 if item.get_closest_marker("slow") else 1)
