#!/usr/bin/env bash
# End-to-end test of deploy/slurm on a real, throw-away single-node Slurm
# cluster (testcluster.sh): real sbatch, job arrays, scancel and requeue,
# real rotsweep binaries over TLS on loopback, real Pfam data.
#
#   1. A sweep launched with `launch` (coordinator job + 3-task worker
#      array) completes; its summary is read through the gRPC client; the
#      token file is private and a wrong token is refused; every array task
#      logs to its own file and exits 0. Cancelling the coordinator and
#      launching again resumes the stored sweep, and a coordinator whose
#      sweep is done ends its job by itself.
#   2. A longer sweep, mid-run: `scancel` of one array task makes its worker
#      hand its job back, and another worker takes it over from the
#      checkpoint; `scancel` of the whole array leaves every unfinished job
#      PENDING; `launch --workers-only` adds workers, one of which gets the
#      time-limit warning (USR1), releases its job and requeues itself; the
#      sweep completes with every epoch stored once and no lease expired.
#
# Prints one line per check and `N passed, N failed`; exits 1 if any check
# failed. Needs root, slurm-wlm, munge, openssl and python3 (for reading
# JSON). Binaries: ROTSWEEP_BIN_DIR, else target/release, else target/debug.
# Stops every daemon it started, by PID, whatever happens.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
if [[ -n ${ROTSWEEP_BIN_DIR:-} ]]; then
    bin_dir=$(cd "$ROTSWEEP_BIN_DIR" && pwd)
elif [[ -x $repo/target/release/rotsweep && -x $repo/target/release/rotsweep-worker ]]; then
    bin_dir=$repo/target/release
else
    bin_dir=$repo/target/debug
fi
rotsweep=$bin_dir/rotsweep

work=$(mktemp -d /tmp/rotsweep-slurm-test.XXXXXX)
cluster=$work/cluster
n_passed=0
n_failed=0

note() { echo "    $*"; }
pass() {
    n_passed=$((n_passed + 1))
    echo "ok   $1"
}
fail() {
    n_failed=$((n_failed + 1))
    echo "FAIL $1"
}
# check DESCRIPTION COMMAND...: one check.
check() {
    local what=$1
    shift
    if "$@"; then pass "$what"; else fail "$what"; fi
}
# wait_until SECONDS DESCRIPTION COMMAND...: polls every 0.2 s.
wait_until() {
    local limit=$1 what=$2 deadline=$((SECONDS + $1))
    shift 2
    while ((SECONDS < deadline)); do
        if "$@" 2>/dev/null; then
            pass "$what"
            return 0
        fi
        sleep 0.2
    done
    fail "$what (not within $limit s)"
    return 1
}
# Stops the test at once (after cleanup) when a step others depend on fails.
need() { "$@" || exit 1; }

dump_logs() {
    for f in "$work"/*/logs/*.log "$cluster"/log/slurmctld.log "$cluster"/log/slurmd.log; do
        [[ -f $f ]] || continue
        echo "----- $f (last 30 lines)"
        tail -n 30 "$f"
    done
}

cleanup() {
    local rc=$?
    trap - EXIT TERM INT
    bash "$here/testcluster.sh" down "$cluster" >/dev/null 2>&1 ||
        echo "warning: stopping the test cluster failed"
    if ((n_failed > 0 || rc != 0)); then
        dump_logs
        echo "kept $work for inspection"
    else
        rm -rf "$work"
    fi
    echo "$n_passed passed, $n_failed failed"
    ((n_failed == 0 && rc == 0)) || exit 1
    exit 0
}
trap cleanup EXIT
trap 'echo "interrupted"; exit 130' TERM INT

# ---------------------------------------------------------------- helpers

# A tiny spec over the shipped Pfam data (sizes as in tests/src/lib.rs).
write_spec() {
    local path=$1 name=$2 models=$3 rotations=$4 epochs=$5 steps=$6
    {
        printf 'name = "%s"\n[data]\ndir = "%s"\nrotations = [%s]\nmax_len = 64\n' \
            "$name" "$repo/examples/data/pfam-real" "$rotations"
        printf '[train]\nepochs = %s\nbatch_size = 16\nsteps_per_epoch = %s\npatience = 1000\nseed = 7\n' \
            "$epochs" "$steps"
        for kind in $models; do
            printf '[models.%s]\nkind = "%s"\nembedding = 8\nconv_filters = 16\nunits = 16\n' "$kind" "$kind"
            printf 'final_units = 16\nheads = 2\nkey_size = 8\ndense = [16]\n'
        done
    } >"$path"
}

# Reads JSON on stdin and prints the value of a Python expression over it
# (`d` is the document).
json() {
    python3 -c 'import json, sys; d = json.load(sys.stdin); r = eval(sys.argv[1]); print(json.dumps(r) if isinstance(r, (dict, list)) else r)' "$1"
}

# client STATE ARGS...: the rotsweep client against STATE's coordinator.
client() {
    local st=$1
    shift
    ROTSWEEP_COORDINATOR=$(cat "$st/coordinator.url") ROTSWEEP_TOKEN_FILE=$st/token \
        ROTSWEEP_TLS_CA=$st/coordinator-ca.crt "$rotsweep" "$@"
}

# status STATE SWEEP: the sweep's job list as JSON.
status() { client "$1" status "$2" --format json; }

# Slurm state of job (or array task) $1; empty once it is gone from squeue.
job_state() { squeue -h -j "$1" -o %T 2>/dev/null | head -n 1; }
is_gone() { [[ -z $(job_state "$1") ]]; }
is_state() { [[ $(job_state "$1") == "$2" ]]; }

# The job completion log's JobState and ExitCode for Slurm job id $1 (an
# array task's own id, or ARRAY_TASK).
jobcomp() {
    local id=$1 line
    if [[ $id == *_* ]]; then
        line=$(grep " ArrayJobId=${id%_*} ArrayTaskId=${id#*_} " "$cluster/log/jobcomp.log" | tail -n 1)
    else
        line=$(grep "^JobId=$id " "$cluster/log/jobcomp.log" | tail -n 1)
    fi
    [[ -n $line ]] || return 1
    sed -n 's/.* JobState=\([A-Z_]*\) .* ExitCode=\([0-9:]*\) .*/\1 \2/p' <<<"$line"
}
jobcomp_is() { [[ $(jobcomp "$1") == "$2" ]]; }

# Whether every job of the sweep in STATE is in state $3.
all_jobs_are() {
    local st=$1 sweep=$2 want=$3
    status "$st" "$sweep" | json "all(j['state'] == '$want' for j in d['jobs']) and len(d['jobs']) > 0" | grep -qx True
}

# The sweep's jobs RUNNING with at least $3 epochs, one per line as
# "JOB_ID WORKER_ID ATTEMPT ROTATION".
running_jobs() {
    status "$1" "$2" |
        json "'\n'.join(f\"{j['job_id']} {j['worker_id']} {j['attempt']} {j['rotation']}\" for j in d['jobs'] if j['state'] == 'RUNNING' and j['epoch'] >= $3)"
}

# ------------------------------------------------------------- the cluster

[[ -x $rotsweep && -x $bin_dir/rotsweep-worker ]] || {
    echo "FAIL binaries missing in $bin_dir (cargo build --workspace)"
    n_failed=1
    exit 1
}
for tool in python3 openssl sbatch; do
    command -v "$tool" >/dev/null || {
        echo "FAIL $tool not found"
        n_failed=1
        exit 1
    }
done
note "binaries: $bin_dir; work folder: $work"

need check "a single-node Slurm cluster starts" \
    bash -c "TESTCLUSTER_CPUS=4 bash '$here/testcluster.sh' up '$cluster' >/dev/null"
export SLURM_CONF=$cluster/slurm.conf

# The coordinator listens on loopback only (nothing here is reachable from
# elsewhere) and still serves TLS with its private CA, as on a cluster.
export ROTSWEEP_LISTEN=127.0.0.1:0 ROTSWEEP_ADVERTISE_HOST=127.0.0.1 ROTSWEEP_POLL=0.5
export ROTSWEEP_BIN_DIR=$bin_dir
unset ROTSWEEP_TOKEN ROTSWEEP_TOKEN_FILE ROTSWEEP_COORDINATOR ROTSWEEP_TLS_CA
# One CPU per task, so a coordinator and three workers share 4 slots.
small=(--cpu --worker-opt=--cpus-per-task=1 --worker-opt=--mem=1G --format json)

# ------------------------------------------- 1. a sweep, start to finish

s1=$work/s1
mkdir -p "$s1"
write_spec "$s1/spec.toml" slurm1 "rnn gru" "0, 1" 2 3
out=$(ROTSWEEP_LINGER=600 "$here/launch" "${small[@]}" --workers 3 --state "$s1/state" "$s1/spec.toml")
check "launch submits a coordinator and a 3-task worker array" \
    test "$(json "d['workers']" <<<"$out")" = 3
coord1=$(json "d['coordinator_job']" <<<"$out")
array1=$(json "d['worker_job']" <<<"$out")
note "coordinator job $coord1, worker array $array1"
check "the token file is readable by its owner only (600)" \
    test "$(stat -c %a "$s1/state/token")" = 600
check "the token never appears on a job's command line or in its environment" \
    bash -c "! scontrol show job $coord1 | grep -qF \"\$(cat '$s1/state/token')\""

need wait_until 60 "the coordinator publishes its URL" test -s "$s1/state/coordinator.url"
check "the coordinator serves TLS" grep -q '^https://' "$s1/state/coordinator.url"
need wait_until 180 "all 4 jobs of sweep 1 complete" all_jobs_are "$s1/state" slurm1 COMPLETED

summary=$(client "$s1/state" summary slurm1 --format json)
check "the summary over gRPC has both models" \
    test "$(json "sorted(m['name'] for m in d['models'])" <<<"$summary")" = '["gru", "rnn"]'
check "each model has a test accuracy in [0, 1] for both rotations" \
    test "$(json "all([r['rotation'] for r in m['rotations']] == [0, 1] and all(0 <= r['test_accuracy'] <= 1 for r in m['rotations']) for m in d['models'])" <<<"$summary")" = True

wrong=$work/wrong-token
(umask 077 && echo not-the-token >"$wrong")
check "a wrong token is refused" bash -c "
    out=\$(ROTSWEEP_COORDINATOR=\$(cat '$s1/state/coordinator.url') ROTSWEEP_TLS_CA='$s1/state/coordinator-ca.crt' \
        '$rotsweep' status slurm1 --token-file '$wrong' 2>&1)
    [[ \$? != 0 && \$out == *nauthenticated* ]]"

for task in 0 1 2; do
    wait_until 60 "array task ${array1}_$task ends COMPLETED with exit 0" \
        jobcomp_is "${array1}_$task" "COMPLETED 0:0"
    check "array task $task logs to its own file" \
        grep -q "worker for sweep slurm1" "$s1/state/logs/worker-${array1}_$task.log"
done
wait_until 30 "the coordinator writes summary.json when the sweep ends" \
    test -s "$s1/state/summary.json"

scancel "$coord1"
wait_until 60 "a cancelled coordinator job ends" is_gone "$coord1"
check "a cancelled coordinator retracts its URL" test ! -e "$s1/state/coordinator.url"

out=$(ROTSWEEP_LINGER=0 "$here/launch" "${small[@]}" --workers 2 --state "$s1/state" "$s1/spec.toml")
coord1b=$(json "d['coordinator_job']" <<<"$out")
array1b=$(json "d['worker_job']" <<<"$out")
wait_until 90 "a relaunched coordinator finds the sweep done and ends COMPLETED" \
    jobcomp_is "$coord1b" "COMPLETED 0:0"
check "the relaunch kept every result (4 jobs COMPLETED, attempt 1)" \
    test "$(json "[(j['state'], j['attempt']) for j in d['jobs']]" <"$s1/state/status.json")" \
    = '[["COMPLETED", 1], ["COMPLETED", 1], ["COMPLETED", 1], ["COMPLETED", 1]]'
wait_until 60 "the relaunch's worker array is gone" is_gone "$array1b"

# ------------------------------ 2. workers cancelled and requeued mid-run

s2=$work/s2
st2=$s2/state
mkdir -p "$s2"
# About 5-10 s per job here: long enough to interrupt, short enough for CI.
write_spec "$s2/spec.toml" slurm2 gru "0, 1, 2, 3" 60 20
out=$(ROTSWEEP_LINGER=600 "$here/launch" "${small[@]}" --workers 2 --state "$st2" "$s2/spec.toml")
coord2=$(json "d['coordinator_job']" <<<"$out")
array2=$(json "d['worker_job']" <<<"$out")
note "coordinator job $coord2, worker array $array2"
need wait_until 60 "the second coordinator publishes its URL" test -s "$st2/coordinator.url"

both_running() { [[ $(running_jobs "$st2" slurm2 2 | grep -c "slurm-${array2}_") == 2 ]]; }
need wait_until 120 "both workers run a job (epoch >= 2)" both_running

# (a) scancel one array task: its worker releases the job, the other takes it.
read -r job_a _ attempt_a rotation_a < <(running_jobs "$st2" slurm2 2 | grep " slurm-${array2}_1 ")
note "task ${array2}_1 runs job $job_a (attempt $attempt_a); cancelling the task"
scancel "${array2}_1"
need wait_until 60 "the cancelled task ends" is_gone "${array2}_1"
check "its worker checkpointed and released the job" \
    grep -q "job released after checkpoint" "$s2/state/logs/worker-${array2}_1.log"
check "its worker exited 0" grep -q "worker exited with status 0" "$st2/logs/worker-${array2}_1.log"

job_attempt_holder() {
    status "$st2" slurm2 | json "[f\"{j['state']} {j['attempt']} {j['worker_id']}\" for j in d['jobs'] if j['job_id'] == $1][0]"
}
released_job_retaken() {
    local st attempt holder
    read -r st attempt holder < <(job_attempt_holder "$job_a")
    [[ ($st == RUNNING || $st == COMPLETED) && $attempt -gt $attempt_a && $holder == "slurm-${array2}_0" ]]
}
need wait_until 180 "the released job is leased again by the remaining worker" released_job_retaken
wait_until 60 "the new attempt resumes from the checkpoint" \
    grep -q "rotation=$rotation_a}.*resuming from checkpoint" "$st2/logs/worker-${array2}_0.log"

# (b) scancel the whole array while a worker trains: the sweep stays
# resumable.
task_running() { running_jobs "$st2" slurm2 1 | grep -q " slurm-$1 "; }
need wait_until 60 "task 0 trains (epoch >= 1)" task_running "${array2}_0"
scancel "$array2"
need wait_until 60 "the cancelled array is gone" is_gone "$array2"
unfinished_are_pending() {
    status "$st2" slurm2 |
        json "all(j['state'] in ('PENDING', 'COMPLETED') for j in d['jobs']) and any(j['state'] == 'PENDING' for j in d['jobs'])" |
        grep -qx True
}
check "every unfinished job is PENDING again (none FAILED, none held)" unfinished_are_pending
check "the coordinator still runs" is_state "$coord2" RUNNING

# (c) More workers for the running coordinator; one of them gets the
# time-limit warning (--signal=B:USR1@120, sent by hand): it releases its
# job and requeues its task, and the other worker finishes the sweep.
out=$("$here/launch" "${small[@]}" --workers 2 --workers-only --state "$st2" "$s2/spec.toml")
array2b=$(json "d['worker_job']" <<<"$out")
check "launch --workers-only reuses the running coordinator" \
    test "$(json "d['coordinator_job']" <<<"$out")" = "$coord2"
new_task_running() { running_jobs "$st2" slurm2 1 | grep -q " slurm-${array2b}_"; }
need wait_until 120 "a new task trains (epoch >= 1)" new_task_running
warned=$(running_jobs "$st2" slurm2 1 | grep -o " slurm-${array2b}_[0-9]* " | head -n 1 | tr -d ' ')
warned=${warned#slurm-}
note "warning task $warned of its time limit"
scancel --batch --signal=USR1 "$warned"
wait_until 60 "the warned task requeues itself (PENDING again)" is_state "$warned" PENDING
check "its worker released the job before the requeue" \
    grep -q "job released after checkpoint" "$st2/logs/worker-$warned.log"
check "the task logged its requeue" grep -q "requeueing this task" "$st2/logs/worker-$warned.log"
need wait_until 240 "the other worker finishes the sweep" all_jobs_are "$st2" slurm2 COMPLETED
# Slurm holds a requeued task back for about two minutes; once the sweep is
# done the coordinator cancels what is still queued.
wait_until 60 "the coordinator cancels the queued, requeued task" is_gone "$array2b"

epochs=$(client "$st2" epochs slurm2 --format json)
check "every job has epochs 1..60, each stored once" \
    test "$(json "sorted({(r['job_id'], r['epoch']) for r in d}) == sorted((r['job_id'], r['epoch']) for r in d) and all(sorted(r['epoch'] for r in d if r['job_id'] == j) == list(range(1, 61)) for j in {r['job_id'] for r in d})" <<<"$epochs")" = True
check "no lease expired: every stop was a voluntary release" \
    bash -c "! grep -qi 'expired' '$st2/logs/coordinator-$coord2.log'"
check "the summary over gRPC has all four rotations" \
    test "$(client "$st2" summary slurm2 --format json | json "[r['rotation'] for r in d['models'][0]['rotations']]")" = "[0, 1, 2, 3]"
scancel "$coord2"
wait_until 60 "the second coordinator ends" is_gone "$coord2"
