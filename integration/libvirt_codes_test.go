package integration

import (
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"

	lv "libvirt.org/go/libvirt"

	"github.com/xlsnap/xlsnap/driver"
	"github.com/xlsnap/xlsnap/errdefs"
)

// codeCase is one refusal: what xlsnap is asked, the code libvirt
// reports, and how libvirt itself is asked the same (nil where libvirt's
// test driver is no oracle: it takes names with '/', refuses DISK_ONLY
// outright and parses an inactive domain's snapshot as online, where the
// QEMU driver, whose codes xlsnap follows, does not).
type codeCase struct {
	what   string
	code   errdefs.Code
	xlsnap func(e *env) error
	oracle func(dom *lv.Domain) error
	// sameText: xlsnap's message is libvirt's, word for word.
	sameText bool
}

func createCase(what string, code errdefs.Code, doc string, flags driver.CreateFlags, oracle, sameText bool) codeCase {
	c := codeCase{what: what, code: code, sameText: sameText,
		xlsnap: func(e *env) error {
			_, err := e.d.SnapshotCreateXML(e.ctx, e.dom, strings.ReplaceAll(doc, "@POOL@", e.pool), flags)
			return err
		}}
	if oracle {
		c.oracle = func(dom *lv.Domain) error {
			s, err := dom.CreateSnapshotXML(strings.ReplaceAll(doc, "@POOL@", "/tmp"), lv.DomainSnapshotCreateFlags(flags))
			if err == nil {
				s.Free()
			}
			return err
		}
	}
	return c
}

func codeCases() []codeCase {
	redef := func(body string) string {
		return "<domainsnapshot>" + body + "</domainsnapshot>"
	}
	const ct, st = "<creationTime>1700000000</creationTime>", "<state>shutoff</state>"
	return []codeCase{
		createCase("redefine with a missing parent", errdefs.CodeInvalidArg,
			redef("<name>x</name>"+st+ct+"<parent><name>nope</name></parent>"), driver.CreateRedefine, true, true),
		createCase("snapshot='bogus' on a disk", errdefs.CodeXMLError,
			redef("<name>x</name><disks><disk name='vda' snapshot='bogus'/></disks>"), 0, true, true),
		// The test driver does not parse an inactive domain's snapshot as
		// offline; the QEMU driver does (qemuSnapshotCreateXMLParse).
		createCase("memory state on a shut-off domain", errdefs.CodeXMLError,
			redef("<name>x</name><memory snapshot='external' file='@POOL@/mem'/>"), 0, false, false),
		createCase("DISK_ONLY with an internal disk", errdefs.CodeConfigUnsupported,
			redef("<name>x</name><disks><disk name='vda' snapshot='internal'/></disks>"), driver.CreateDiskOnly, false, false),
		createCase("a name with /", errdefs.CodeXMLDetail, redef("<name>a/b</name>"), 0, false, false),
		createCase("malformed XML", errdefs.CodeXMLDetail, "<domainsnapshot><name>x</name", 0, true, false),
		createCase("redefine without a name", errdefs.CodeXMLError, redef(st+ct), driver.CreateRedefine, true, true),
		createCase("redefine without creationTime", errdefs.CodeInternal, redef("<name>x</name>"+st), driver.CreateRedefine, true, true),
		createCase("redefine without state", errdefs.CodeXMLError, redef("<name>x</name>"+ct), driver.CreateRedefine, true, true),
		createCase("REDEFINE|NO_METADATA", errdefs.CodeInvalidArg, redef("<name>x</name>"+st+ct),
			driver.CreateRedefine|driver.CreateNoMetadata, true, true),
		createCase("REDEFINE|HALT", errdefs.CodeInvalidArg, redef("<name>x</name>"+st+ct), driver.CreateRedefine|driver.CreateHalt, true, true),
		// virDomainSnapshotRedefineValidate (the test driver refuses the
		// flag itself, with the same code).
		createCase("REDEFINE|DISK_ONLY of a shut-off snapshot", errdefs.CodeInvalidArg, redef("<name>x</name>"+st+ct),
			driver.CreateRedefine|driver.CreateDiskOnly, true, false),
		createCase("REDEFINE|LIVE", errdefs.CodeInvalidArg, redef("<name>x</name>"+st+ct), driver.CreateRedefine|driver.CreateLive, false, false),
		createCase("QUIESCE without DISK_ONLY", errdefs.CodeInvalidArg, redef("<name>x</name>"), driver.CreateQuiesce, false, false),
		createCase("CURRENT without REDEFINE", errdefs.CodeInvalidArg, redef("<name>x</name>"), driver.CreateCurrent, true, true),
		createCase("another root element", errdefs.CodeXMLError, "<domain><name>x</name></domain>", 0, true, true),
		createCase("redefine with an unknown state", errdefs.CodeConfigUnsupported,
			redef("<name>x</name><state>bogus</state>"+ct), driver.CreateRedefine, true, true),
		createCase("VALIDATE with an element the schema lacks", errdefs.CodeXMLInvalidSchema,
			redef("<name>v1</name><bogus/>"), driver.CreateValidate, true, false),
		createCase("an unknown create flag", errdefs.CodeInvalidArg, redef("<name>x</name>"), 1<<20, true, false),
		{what: "an unknown delete flag", code: errdefs.CodeInvalidArg,
			xlsnap: func(e *env) error { _, err := e.d.SnapshotDelete(e.ctx, e.dom, "s1", 1<<20); return err },
			oracle: func(dom *lv.Domain) error {
				return onSnapshot(dom, func(s *lv.DomainSnapshot) error { return s.Delete(1 << 20) })
			}},
		{what: "CHILDREN|CHILDREN_ONLY", code: errdefs.CodeInvalidArg, sameText: true,
			xlsnap: func(e *env) error {
				_, err := e.d.SnapshotDelete(e.ctx, e.dom, "s1", driver.DeleteChildren|driver.DeleteChildrenOnly)
				return err
			},
			oracle: func(dom *lv.Domain) error {
				return onSnapshot(dom, func(s *lv.DomainSnapshot) error {
					return s.Delete(lv.DOMAIN_SNAPSHOT_DELETE_CHILDREN | lv.DOMAIN_SNAPSHOT_DELETE_CHILDREN_ONLY)
				})
			}},
		{what: "RUNNING|PAUSED", code: errdefs.CodeInvalidArg, sameText: true,
			xlsnap: func(e *env) error {
				return e.d.RevertToSnapshot(e.ctx, e.dom, "s1", driver.RevertRunning|driver.RevertPaused)
			},
			oracle: func(dom *lv.Domain) error {
				return onSnapshot(dom, func(s *lv.DomainSnapshot) error {
					return s.RevertToSnapshot(lv.DOMAIN_SNAPSHOT_REVERT_RUNNING | lv.DOMAIN_SNAPSHOT_REVERT_PAUSED)
				})
			}},
		{what: "an unknown list flag", code: errdefs.CodeInvalidArg,
			xlsnap: func(e *env) error { _, err := e.d.ListAllSnapshots(e.ctx, e.dom, 1<<20); return err },
			oracle: func(dom *lv.Domain) error { _, err := dom.ListAllSnapshots(1 << 20); return err }},
		{what: "an unknown children flag", code: errdefs.CodeInvalidArg,
			xlsnap: func(e *env) error { _, err := e.d.SnapshotListAllChildren(e.ctx, e.dom, "s1", 1<<20); return err },
			oracle: func(dom *lv.Domain) error {
				return onSnapshot(dom, func(s *lv.DomainSnapshot) error { _, err := s.ListAllChildren(1 << 20); return err })
			}},
		{what: "a flag on lookup", code: errdefs.CodeInvalidArg,
			xlsnap: func(e *env) error { _, err := e.d.SnapshotLookupByName(e.ctx, e.dom, "s1", 4); return err },
			oracle: func(dom *lv.Domain) error {
				s, err := dom.SnapshotLookupByName("s1", 4)
				if err == nil {
					s.Free()
				}
				return err
			}},
		{what: "an unknown dumpxml flag", code: errdefs.CodeInvalidArg,
			xlsnap: func(e *env) error { _, err := e.d.SnapshotGetXMLDesc(e.ctx, e.dom, "s1", 1<<20); return err },
			oracle: func(dom *lv.Domain) error {
				return onSnapshot(dom, func(s *lv.DomainSnapshot) error { _, err := s.GetXMLDesc(1 << 20); return err })
			}},
	}
}

// onSnapshot runs fn on the oracle domain's snapshot s1.
func onSnapshot(dom *lv.Domain, fn func(*lv.DomainSnapshot) error) error {
	s, err := dom.SnapshotLookupByName("s1", 0)
	if err != nil {
		return err
	}
	defer s.Free()
	return fn(s)
}

var oracleSeq atomic.Int64

// oracleDomain defines a shut-off domain of libvirt's test driver with a
// snapshot s1, for libvirt's own answer to each case.
func oracleDomain(t *testing.T) *lv.Domain {
	t.Helper()
	conn, err := lv.NewConnect("test:///default")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	name := fmt.Sprintf("xl_oracle_%d", oracleSeq.Add(1))
	dom, err := conn.DomainDefineXML(fmt.Sprintf(`<domain type='test'><name>%s</name><memory>65536</memory><os><type>hvm</type></os>
<devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/tmp/%s.qcow2'/><target dev='vda'/></disk></devices></domain>`, name, name))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dom.Undefine(); dom.Free() })
	s, err := dom.CreateSnapshotXML("<domainsnapshot><name>s1</name></domainsnapshot>", 0)
	if err != nil {
		t.Fatal(err)
	}
	s.Free()
	t.Cleanup(func() {
		if s, err := dom.SnapshotLookupByName("s1", 0); err == nil {
			s.Delete(0)
			s.Free()
		}
	})
	return dom
}

// TestLibvirtCodes: each refusal issue #12 lists, and each flag check,
// has libvirt's code (errdefs.CodeOf), libvirt's words where xlsnap's
// follow them, and changes nothing: the definition, every image, the
// records and the snapshot list are as they were (SnapshotDelete(s1,
// 1<<20) used to delete s1). Where libvirt's test driver answers as the
// QEMU driver does, libvirt itself is asked the same and must agree.
func TestLibvirtCodes(t *testing.T) {
	oracle := oracleDomain(t)
	cases := codeCases()
	// libvirt's answers first, once: its test driver is shared state.
	libvirtSays := map[string]lv.Error{}
	for _, c := range cases {
		if c.oracle == nil {
			continue
		}
		var le lv.Error
		if err := c.oracle(oracle); !errors.As(err, &le) {
			t.Fatalf("%s: libvirt's test driver: %v, want a refusal", c.what, err)
		}
		if errdefs.Code(le.Code) != c.code {
			t.Fatalf("%s: libvirt itself says %d (%s), the case says %d", c.what, le.Code, le.Message, c.code)
		}
		libvirtSays[c.what] = le
	}
	both(t, nil, func(t *testing.T, e *env) {
		e.write(0)
		e.snap("s1", driver.CreateDiskOnly)
		e.write(1)
		for _, c := range cases {
			t.Run(c.what, func(t *testing.T) {
				before := e.state()
				err := c.xlsnap(e)
				if got := errdefs.CodeOf(err); got != c.code {
					t.Fatalf("%v: code %d, libvirt's is %d", err, got, c.code)
				}
				if le, ok := libvirtSays[c.what]; ok && c.sameText && err.Error() != le.Message {
					t.Errorf("message %q, libvirt's %q", err, le.Message)
				}
				e.expectUnchanged(before)
			})
		}
		e.expectList(0, "s1")
		e.expectChain("vda", "vda.s1", "vda.qcow2")
		e.finish()
	})
}
